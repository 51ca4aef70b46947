// The Vercel AI SDK against servelm (issue 30): the default `openai(model)` (the
// Responses API) and `@ai-sdk/openai-compatible` (chat completions): plain, stream,
// structured output and a named tool choice. Prints one JSON object of what it saw;
// tests/clients/test_ai_sdk.py asserts on it.
import { generateObject, generateText, jsonSchema, streamText, tool } from "ai";
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";

const { SERVELM_V1: baseURL, SERVELM_KEY: apiKey, SERVELM_MODEL: model } = process.env;
const bias = JSON.parse(process.env.SERVELM_BIAS || "{}");
const out = {};

async function streamed(result) {
  let text = "";
  let raw = null;
  for await (const part of result.fullStream) {
    if (part.type === "text-delta") text += part.text;
    if (part.type === "raw") raw = part.rawValue;
    if (part.type === "error") throw part.error;
  }
  return { text, usage: await result.usage, last: raw };
}

// The default provider: the Responses API.
const openai = createOpenAI({ baseURL, apiKey });
const plain = await generateText({ model: openai(model), prompt: "Say hi.", maxOutputTokens: 6 });
out.responses_plain = {
  text: plain.text,
  usage: plain.usage,
  cost: plain.response.body.usage.cost,
  xcost: plain.response.headers["x-cost"],
};
const s = await streamed(
  streamText({ model: openai(model), prompt: "Say hi.", maxOutputTokens: 6, includeRawChunks: true }),
);
out.responses_stream = { text: s.text, usage: s.usage, cost: s.last.response.usage.cost };

// Chat completions, through the OpenAI-compatible provider.
const compat = createOpenAICompatible({
  name: "servelm",
  baseURL,
  apiKey,
  includeUsage: true,
  supportsStructuredOutputs: true,
});
const chat = await generateText({ model: compat(model), prompt: "Say hi.", maxOutputTokens: 6 });
out.chat_plain = { text: chat.text, usage: chat.usage, cost: chat.response.body.usage.cost };
const cs = await streamed(
  streamText({ model: compat(model), prompt: "Say hi.", maxOutputTokens: 6, includeRawChunks: true }),
);
out.chat_stream = { text: cs.text, usage: cs.usage, cost: cs.last.usage.cost };
const object = await generateObject({
  model: compat(model),
  prompt: "Is the sky blue?",
  schema: jsonSchema({
    type: "object",
    properties: { answer: { type: "string", enum: ["yes", "no"] } },
    required: ["answer"],
    additionalProperties: false,
  }),
  maxOutputTokens: 40,
});
out.chat_object = object.object;
const called = await generateText({
  model: compat(model),
  prompt: "What time is it?",
  tools: {
    get_weather: tool({
      description: "Current weather in a city.",
      inputSchema: jsonSchema({
        type: "object",
        properties: { city: { type: "string" } },
        required: ["city"],
      }),
    }),
    get_time: tool({
      description: "The current time.",
      inputSchema: jsonSchema({ type: "object", properties: {}, additionalProperties: false }),
    }),
  },
  toolChoice: { type: "tool", toolName: "get_time" },
  maxOutputTokens: 40,
  temperature: 0,
  providerOptions: { servelm: { logit_bias: bias } },
});
out.chat_tool = called.toolCalls.map((c) => ({ name: c.toolName, input: c.input }));
console.log(JSON.stringify(out));
