// The axios example from Segmind's Mixtral 8x7B page, verbatim; the test swaps in the
// host and the key.
const axios = require('axios');
const api_key = "YOUR API-KEY";
const url = "https://api.segmind.com/v1/mixtral-8x7b-instruct";

const data = {
  "messages": [
    {
      "role": "user",
      "content": "tell me a joke on cats"
    },
    {
      "role": "assistant",
      "content": "here is a joke about cats..."
    },
    {
      "role": "user",
      "content": "now a joke on dogs"
    }
  ]
};

(async function() {
  try {
    const response = await axios.post(url, data, { headers: { 'x-api-key': api_key } });
    console.log(response.data);
  } catch (error) {
    console.error('Error:', error.response.data);
  }
})();
