// tests/server/sdk.test.mjs -- drive ds4-server with the real client libraries.
//
// Run by run.sh, which starts the server with a test script of forced
// replies and sets DS4_URL, DS4_KEY and DS4_PORT. Each test is a plain async
// function; the last line is "N passed, N failed".
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import assert from 'node:assert/strict';
import net from 'node:net';

const URL = process.env.DS4_URL;
const KEY = process.env.DS4_KEY;
const PORT = Number(process.env.DS4_PORT);
const openai = new OpenAI({ baseURL: `${URL}/v1`, apiKey: KEY, maxRetries: 0, timeout: 60000 });
const anthropic = new Anthropic({ baseURL: URL, apiKey: KEY, maxRetries: 0, timeout: 60000 });

const weatherTool = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'Weather for a city',
    parameters: {
      type: 'object',
      properties: { location: { type: 'string' }, days: { type: 'integer' } },
      required: ['location'],
    },
  },
};
const UNICODE = 'h\u00e9llo \u{1F600} w\u00f6rld';

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

// ---- OpenAI chat completions

test('openai: models.list', async () => {
  const list = await openai.models.list();
  assert.ok(list.data.some((m) => m.id === 'deepseek-v4-flash'));
});

test('openai: chat non-streaming, UTF-8 intact', async () => {
  const r = await openai.chat.completions.create({
    model: 'deepseek-chat', messages: [{ role: 'user', content: 'unicode please' }],
  });
  assert.equal(r.choices[0].message.content, UNICODE);
  assert.equal(r.choices[0].finish_reason, 'stop');
  assert.ok(r.usage.prompt_tokens > 0 && r.usage.completion_tokens > 0);
});

test('openai: chat streaming with include_usage', async () => {
  const stream = await openai.chat.completions.create({
    model: 'deepseek-chat', stream: true, stream_options: { include_usage: true },
    messages: [{ role: 'user', content: 'unicode please' }],
  });
  let text = '', finish = null, usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      text += c.delta?.content ?? '';
      finish = c.finish_reason ?? finish;
    }
  }
  assert.equal(text, UNICODE);
  assert.equal(finish, 'stop');
  assert.ok(usage && usage.total_tokens === usage.prompt_tokens + usage.completion_tokens);
});

test('openai: thinking (deepseek-reasoner) splits reasoning and content', async () => {
  const r = await openai.chat.completions.create({
    model: 'deepseek-reasoner', messages: [{ role: 'user', content: 'Think about 2+2' }],
  });
  assert.equal(r.choices[0].message.reasoning_content, 'Short thought.');
  assert.equal(r.choices[0].message.content, 'The answer is 4.');
});

test('openai: finish_reason length under max_tokens', async () => {
  const r = await openai.chat.completions.create({
    model: 'deepseek-chat', max_tokens: 2, messages: [{ role: 'user', content: 'unicode please' }],
  });
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 2);
});

test('openai: stop string is cut out', async () => {
  const r = await openai.chat.completions.create({
    model: 'deepseek-chat', stop: ['STOP'], messages: [{ role: 'user', content: 'stop test' }],
  });
  assert.equal(r.choices[0].message.content, 'alpha beta ');
  assert.equal(r.choices[0].finish_reason, 'stop');
});

test('openai: tool call round trip, exact replay reuses the whole prefix', async () => {
  const messages = [
    { role: 'system', content: 'You are a weather bot.' },
    { role: 'user', content: 'Weather in Rome for 2 days?' },
  ];
  const r1 = await openai.chat.completions.create({ model: 'deepseek-chat', messages, tools: [weatherTool] });
  const m = r1.choices[0].message;
  assert.equal(r1.choices[0].finish_reason, 'tool_calls');
  assert.equal(m.content, 'Let me check.');
  assert.equal(m.tool_calls.length, 1);
  assert.match(m.tool_calls[0].id, /^call_[0-9a-f]{32}$/);
  assert.equal(m.tool_calls[0].function.name, 'get_weather');
  assert.deepEqual(JSON.parse(m.tool_calls[0].function.arguments), { location: 'Rome', days: 2 });
  messages.push(m, { role: 'tool', tool_call_id: m.tool_calls[0].id, content: '{"t": 21}' });
  const r2 = await openai.chat.completions.create({ model: 'deepseek-chat', messages, tools: [weatherTool] });
  assert.equal(r2.choices[0].message.content, 'It is 21C in Rome.');
  const cached = r2.usage.prompt_tokens_details.cached_tokens;
  assert.equal(cached, r1.usage.prompt_tokens + r1.usage.completion_tokens,
    `cached ${cached} != ${r1.usage.prompt_tokens} + ${r1.usage.completion_tokens}`);
});

test('openai: canonical replay when the id is unknown (still a valid prompt)', async () => {
  const messages = [
    { role: 'user', content: 'Weather in Rome for 2 days?' },
    { role: 'assistant', content: 'Let me check.', tool_calls: [{ id: 'call_unknown', type: 'function',
      function: { name: 'get_weather', arguments: '{"location":"Rome","days":2}' } }] },
    { role: 'tool', tool_call_id: 'call_unknown', content: 'sunny' },
  ];
  const r = await openai.chat.completions.create({ model: 'deepseek-chat', messages, tools: [weatherTool] });
  assert.equal(r.choices[0].message.content, 'It is 21C in Rome.');
});

test('openai: streamed tool call: name first, then argument deltas', async () => {
  const stream = await openai.chat.completions.create({
    model: 'deepseek-chat', stream: true, tools: [weatherTool],
    messages: [{ role: 'user', content: 'Weather in Rome for 2 days?' }],
  });
  let first = null, args = '', deltas = 0, finish = null;
  for await (const chunk of stream) {
    const c = chunk.choices[0];
    if (!c) continue;
    finish = c.finish_reason ?? finish;
    for (const tc of c.delta?.tool_calls ?? []) {
      if (!first) first = tc;
      args += tc.function?.arguments ?? '';
      deltas++;
    }
  }
  assert.equal(first.function.name, 'get_weather');
  assert.ok(first.id.startsWith('call_'));
  assert.ok(deltas >= 3, `only ${deltas} tool-call deltas`);
  assert.deepEqual(JSON.parse(args), { location: 'Rome', days: 2 });
  assert.equal(finish, 'tool_calls');
});

test('openai: bad field type is a 400 BadRequestError', async () => {
  await assert.rejects(
    openai.chat.completions.create({ model: 'x', temperature: 'hot', messages: [{ role: 'user', content: 'hi' }] }),
    (e) => e instanceof OpenAI.BadRequestError && /temperature/.test(e.message));
});

test('openai: legacy completions', async () => {
  const r = await openai.completions.create({ model: 'deepseek-v4-flash', prompt: 'unicode please' });
  assert.equal(r.choices[0].text, UNICODE);
});

test('openai: 16 concurrent clients all get their own complete answer', async () => {
  const replies = await Promise.all(Array.from({ length: 16 }, (_, k) => {
    const i = k + 1;
    return openai.chat.completions.create({
      model: 'deepseek-chat', stream: i % 2 === 0,
      messages: [{ role: 'user', content: `concurrency test ${i} of 16` }],
    }).then(async (r) => {
      if (!(i % 2 === 0)) return [i, r.choices[0].message.content];
      let text = '';
      for await (const chunk of r) text += chunk.choices[0]?.delta?.content ?? '';
      return [i, text];
    });
  }));
  for (const [i, text] of replies) assert.equal(text, `answer ${i}`);
});

test('openai: a client that disconnects mid-stream frees the worker', async () => {
  const controller = new AbortController();
  const stream = await openai.chat.completions.create({
    model: 'deepseek-chat', stream: true, max_tokens: 8000,
    messages: [{ role: 'user', content: 'ramble on forever' }],
  }, { signal: controller.signal });
  let n = 0;
  try {
    for await (const chunk of stream) { if (++n >= 5) controller.abort(); }
  } catch (e) { /* the abort */ }
  const t0 = Date.now();
  const r = await openai.chat.completions.create({
    model: 'deepseek-chat', messages: [{ role: 'user', content: 'unicode please' }],
  });
  assert.equal(r.choices[0].message.content, UNICODE);
  assert.ok(Date.now() - t0 < 8000, `next request waited ${Date.now() - t0} ms`);
});

// ---- Anthropic Messages

test('anthropic: messages non-streaming', async () => {
  const r = await anthropic.messages.create({
    model: 'deepseek-chat', max_tokens: 100, messages: [{ role: 'user', content: 'unicode please' }],
  });
  assert.equal(r.content.find((b) => b.type === 'text').text, UNICODE);
  assert.equal(r.stop_reason, 'end_turn');
});

test('anthropic: streaming with thinking', async () => {
  const stream = anthropic.messages.stream({
    model: 'deepseek-v4-flash', max_tokens: 100, thinking: { type: 'enabled', budget_tokens: 1024 },
    system: [{ type: 'text', text: 'Be brief.' }],
    messages: [{ role: 'user', content: 'Think about 2+2' }],
  });
  let textDeltas = '';
  stream.on('text', (t) => { textDeltas += t; });
  const msg = await stream.finalMessage();
  assert.equal(msg.content[0].type, 'thinking');
  assert.equal(msg.content[0].thinking, 'Short thought.');
  assert.equal(msg.content[1].text, 'The answer is 4.');
  assert.equal(textDeltas, 'The answer is 4.');
});

test('anthropic: stop_sequences', async () => {
  const r = await anthropic.messages.create({
    model: 'deepseek-chat', max_tokens: 100, stop_sequences: ['STOP'],
    messages: [{ role: 'user', content: 'stop test' }],
  });
  assert.equal(r.stop_reason, 'stop_sequence');
  assert.equal(r.stop_sequence, 'STOP');
  assert.equal(r.content[0].text, 'alpha beta ');
});

test('anthropic: tool_use round trip with cache_read_input_tokens', async () => {
  const tools = [{ name: 'get_weather', description: 'Weather for a city',
    input_schema: weatherTool.function.parameters }];
  const messages = [{ role: 'user', content: 'Weather in Rome for 2 days?' }];
  const stream = anthropic.messages.stream({ model: 'deepseek-chat', max_tokens: 200, tools, messages });
  const r1 = await stream.finalMessage();
  assert.equal(r1.stop_reason, 'tool_use');
  const use = r1.content.find((b) => b.type === 'tool_use');
  assert.match(use.id, /^toolu_[0-9a-f]{32}$/);
  assert.deepEqual(use.input, { location: 'Rome', days: 2 });
  messages.push({ role: 'assistant', content: r1.content },
    { role: 'user', content: [{ type: 'tool_result', tool_use_id: use.id, content: '21C' }] });
  const r2 = await anthropic.messages.create({ model: 'deepseek-chat', max_tokens: 200, tools, messages });
  assert.equal(r2.content[0].text, 'It is 21C in Rome.');
  const total1 = r1.usage.input_tokens + r1.usage.cache_read_input_tokens + r1.usage.output_tokens;
  assert.equal(r2.usage.cache_read_input_tokens, total1);
});

// ---- The prompt cache (ds4.c 13.10): a prompt sent twice is all cached the second time,
// although the session generated past it (it rewinds to the prompt's end checkpoint).

test('cache: openai chat, the same prompt twice', async () => {
  const req = { model: 'deepseek-chat', max_tokens: 6, temperature: 0,
    messages: [{ role: 'user', content: 'Cache probe: the same prompt sent twice, via openai.' }] };
  const r1 = await openai.chat.completions.create(req);
  const r2 = await openai.chat.completions.create(req);
  assert.ok(r1.usage.prompt_tokens_details.cached_tokens < r1.usage.prompt_tokens);
  assert.equal(r2.usage.prompt_tokens_details.cached_tokens, r2.usage.prompt_tokens);
  assert.equal(r2.choices[0].message.content, r1.choices[0].message.content);
});

test('cache: anthropic messages, the same prompt twice', async () => {
  const req = { model: 'deepseek-chat', max_tokens: 6, temperature: 0,
    messages: [{ role: 'user', content: 'Cache probe: the same prompt sent twice, via anthropic.' }] };
  const r1 = await anthropic.messages.create(req);
  const r2 = await anthropic.messages.create(req);
  assert.ok(r1.usage.input_tokens > 0);
  assert.equal(r2.usage.input_tokens, 0);
  assert.equal(r2.usage.cache_read_input_tokens, r1.usage.input_tokens + r1.usage.cache_read_input_tokens);
  assert.deepEqual(r2.content, r1.content);
});

test('anthropic: count_tokens', async () => {
  const r = await anthropic.messages.countTokens({
    model: 'deepseek-chat', messages: [{ role: 'user', content: 'hello there' }],
  });
  assert.ok(r.input_tokens > 3);
});

test('anthropic: missing messages is a 400 in the Anthropic shape', async () => {
  await assert.rejects(anthropic.messages.create({ model: 'x', max_tokens: 5, messages: [] }),
    (e) => e instanceof Anthropic.BadRequestError && e.error?.type === 'error');
});

// ---- OpenAI Responses

test('responses: non-streaming output_text', async () => {
  const r = await openai.responses.create({ model: 'deepseek-chat', input: 'unicode please' });
  assert.equal(r.status, 'completed');
  assert.equal(r.output_text, UNICODE);
});

test('responses: streaming with reasoning summary', async () => {
  const stream = await openai.responses.create({
    model: 'deepseek-v4-flash', stream: true, reasoning: { effort: 'high' },
    instructions: 'Be brief.', input: 'Think about 2+2',
  });
  let text = '', summary = '', done = null, seq = -1, ordered = true;
  for await (const ev of stream) {
    ordered &&= ev.sequence_number === seq + 1;
    seq = ev.sequence_number;
    if (ev.type === 'response.output_text.delta') text += ev.delta;
    if (ev.type === 'response.reasoning_summary_text.delta') summary += ev.delta;
    if (ev.type === 'response.completed') done = ev.response;
  }
  assert.ok(ordered, 'sequence numbers must count up from 0');
  assert.equal(summary, 'Short thought.');
  assert.equal(text, 'The answer is 4.');
  assert.equal(done.output.length, 2);
  assert.equal(done.output[1].content[0].text, 'The answer is 4.');
});

test('responses: function_call round trip reuses the prefix', async () => {
  const tools = [{ type: 'function', name: 'get_weather', description: 'Weather for a city',
    parameters: weatherTool.function.parameters }];
  const input = [{ role: 'user', content: 'Weather in Rome for 2 days?' }];
  const r1 = await openai.responses.create({ model: 'deepseek-chat', tools, input });
  const call = r1.output.find((o) => o.type === 'function_call');
  assert.equal(call.name, 'get_weather');
  assert.deepEqual(JSON.parse(call.arguments), { location: 'Rome', days: 2 });
  input.push(...r1.output, { type: 'function_call_output', call_id: call.call_id, output: '21C' });
  const r2 = await openai.responses.create({ model: 'deepseek-chat', tools, input });
  assert.equal(r2.output_text, 'It is 21C in Rome.');
  // At least the first turn and its call are reused; another session in memory (13.10) may
  // hold more of this prompt (an earlier test's identical conversation) and is then preferred.
  const cached = r2.usage.input_tokens_details.cached_tokens;
  assert.ok(cached >= r1.usage.input_tokens + r1.usage.output_tokens && cached < r2.usage.input_tokens,
    `cached ${cached}, first turn ${r1.usage.input_tokens}+${r1.usage.output_tokens}, prompt ${r2.usage.input_tokens}`);
});

test('responses: streamed function_call', async () => {
  const tools = [{ type: 'function', name: 'get_weather', parameters: weatherTool.function.parameters }];
  const stream = await openai.responses.create({
    model: 'deepseek-chat', stream: true, tools, input: 'Weather in Rome for 2 days?',
  });
  let item = null, final = null;
  for await (const ev of stream) {
    if (ev.type === 'response.output_item.done' && ev.item.type === 'function_call') item = ev.item;
    if (ev.type === 'response.completed') final = ev.response;
  }
  assert.deepEqual(JSON.parse(item.arguments), { location: 'Rome', days: 2 });
  assert.equal(final.output.at(-1).call_id, item.call_id);
});

// ---- raw sockets: what curl cannot do

function rawExchange(chunks, gapMs, halfClose) {
  return new Promise((resolve) => {
    const s = net.connect(PORT, '127.0.0.1');
    let data = '';
    s.on('data', (d) => { data += d; });
    s.on('close', () => resolve(data));
    s.on('error', () => resolve(data));
    let i = 0;
    const next = () => {
      if (s.destroyed) return;
      if (i < chunks.length) { s.write(chunks[i++]); setTimeout(next, gapMs); } else if (halfClose) s.end();
    };
    s.on('connect', next);
    setTimeout(() => s.destroy(), 15000);
  });
}

test('raw: slowloris head gets 408 within the header timeout', async () => {
  const t0 = Date.now();
  const drip = ['GET /health HTTP/1.1\r\n', ...Array.from({ length: 40 }, (_, k) => `X-Drip-${k}: 1\r\n`)];
  const reply = await rawExchange(drip, 200, false);
  assert.match(reply, /^HTTP\/1.1 408 /);
  assert.match(reply, /"error"/);
  assert.ok(Date.now() - t0 < 6000);
});

test('raw: truncated body then close gets 400', async () => {
  const head = `POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${KEY}\r\n` +
    'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"messages": [';
  const reply = await rawExchange([head], 10, true);
  assert.match(reply, /^HTTP\/1.1 400 /);
  assert.match(reply, /truncated body/);
});

test('raw: garbage request line gets 400', async () => {
  const reply = await rawExchange(['HELLO\r\n\r\n'], 10, true);
  assert.match(reply, /^HTTP\/1.1 400 /);
});

let passed = 0, failed = 0;
for (const t of tests) {
  try {
    await t.fn();
    passed++;
    console.log(`ok   ${t.name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${t.name}: ${e?.stack ?? e}`);
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
