// The official `openai` npm client streaming a chat completion: node openai_stream_chat.mjs
// BASE_URL MODEL (key "test-key"). Prints one JSON line with the streamed text, chunk count,
// finish_reason, usage and the listed model ids, then one with the HTTP status an unknown model got.
// Copied next to node_modules by the tests that install the package (tests/testing/curl.h).
import OpenAI from 'openai';
const client = new OpenAI({ baseURL: process.argv[2], apiKey: 'test-key' });
const stream = await client.chat.completions.create({
  model: process.argv[3],
  messages: [{ role: 'system', content: 'You tell stories.' },
             { role: 'user', content: 'Once upon a time' }],
  max_tokens: 20,
  stream: true,
  stream_options: { include_usage: true },
});
let text = '', chunks = 0, finish = null, usage = null;
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) {
    text += c.delta?.content ?? '';
    if (c.finish_reason) finish = c.finish_reason;
  }
  chunks++;
}
const models = await client.models.list();
console.log(JSON.stringify({ text, chunks, finish, usage, models: models.data.map(m => m.id) }));
try {
  await client.chat.completions.create({ model: 'nope', messages: [{role: 'user', content: 'x'}] });
} catch (e) {
  console.log(JSON.stringify({ errorStatus: e.status }));
}
