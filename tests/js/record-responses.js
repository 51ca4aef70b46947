// Preloaded with `node -r`: prints every axios response (status, headers, body) as one
// JSON line on stderr, so a test can check headers of a snippet it runs unchanged.
const axios = require('axios');

function record(response) {
  const { status, headers, data } = response;
  process.stderr.write(JSON.stringify({ status, headers, data }) + '\n');
}

axios.interceptors.response.use(
  (response) => { record(response); return response; },
  (error) => { if (error.response) record(error.response); return Promise.reject(error); },
);
