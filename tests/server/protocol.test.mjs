// tests/server/protocol.test.mjs -- protocol fidelity (issue 9, item 1).
//
// Starts its own `ds4 --server` (DS4_BIN, default ./ds4) on the tiny model
// with a test script of its own, then checks with the real `openai` and
// `@anthropic-ai/sdk` packages and raw fetch that every request field real
// agents send is honoured or refused with a 400 naming it:
// mid-conversation system messages, tool_choice, parallel_tool_calls,
// response_format / text.format / output_config.format, logprobs,
// penalties, Responses custom and namespace tools, hosted tools, unknown
// fields and model ids. Prints what it compared; last line "N passed, N failed".
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const BIN = process.env.DS4_BIN ?? './ds4';
const MODEL = process.env.MODEL ?? 'vectors/tiny.gguf';
const D = '\uff5cDSML\uff5c';
const call = (name, params) => `\n\n<${D}tool_calls>\n<${D}invoke name="${name}">\n` +
  Object.entries(params).map(([k, v]) => `<${D}parameter name="${k}" string="true">${v}</${D}parameter>`).join('\n') +
  `\n</${D}invoke>\n</${D}tool_calls>`;
const twoCalls = `\n\n<${D}tool_calls>\n<${D}invoke name="get_weather">\n` +
  `<${D}parameter name="location" string="true">Rome</${D}parameter>\n</${D}invoke>\n` +
  `<${D}invoke name="get_weather">\n<${D}parameter name="location" string="true">Oslo</${D}parameter>\n` +
  `</${D}invoke>\n</${D}tool_calls>`;
const PATCH = '*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch';
const script = [
  { match: 'two calls please', reply: twoCalls },
  { match: 'apply the patch', reply: call('apply_patch', { input: PATCH }) },
  { match: 'close the agent', reply: call('multi_agent_v1.close_agent', { target: 'a1' }) },
  { match: 'scripted words', reply: 'alpha beta gamma' },
];

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ds4-protocol-'));
fs.writeFileSync(path.join(tmp, 'script.json'), JSON.stringify(script));
const KEY = 'protocol-key';
const server = spawn(BIN, ['--server', '-m', MODEL, '--port', '0', '--port-file', path.join(tmp, 'port'),
  '--api-key', KEY, '--test-script', path.join(tmp, 'script.json'), '--ctx', '8192'],
  { stdio: ['ignore', 'ignore', 'pipe'] });
let stderr = '';
server.stderr.on('data', (d) => { stderr += d; });
let port = null;
for (let i = 0; i < 100 && !port; i++) {
  await new Promise((r) => setTimeout(r, 100));
  try { port = Number(fs.readFileSync(path.join(tmp, 'port'), 'utf8')); } catch { port = null; }
}
if (!port) {
  console.log(stderr);
  console.log('0 passed, 1 failed');
  server.kill();
  process.exit(1);
}
const URL = `http://127.0.0.1:${port}`;
const openai = new OpenAI({ baseURL: `${URL}/v1`, apiKey: KEY, maxRetries: 0, timeout: 120000 });
const anthropic = new Anthropic({ baseURL: URL, apiKey: KEY, maxRetries: 0, timeout: 120000 });
const raw = async (route, body) => {
  const r = await fetch(`${URL}${route}`, {
    method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${KEY}` },
    body: JSON.stringify(body),
  });
  return { status: r.status, body: await r.json() };
};

const fn = (name, properties = {}) => ({
  type: 'function', function: { name, parameters: { type: 'object', properties } },
});
const tools = [fn('get_weather', { location: { type: 'string' } }), fn('get_time')];

const tests = [];
const test = (name, f) => tests.push({ name, f });

// ---- mid-conversation system messages

test('openai: a system message after the user turn is folded into it (prompt_tokens equal)', async () => {
  const a = await openai.chat.completions.create({
    model: 'deepseek-chat', max_tokens: 1,
    messages: [{ role: 'user', content: 'hello' }, { role: 'system', content: 'be brief' }],
  });
  const b = await openai.chat.completions.create({
    model: 'deepseek-chat', max_tokens: 1, messages: [{ role: 'user', content: 'hello\n\nbe brief' }],
  });
  console.log(`     prompt_tokens with a trailing system message ${a.usage.prompt_tokens}, folded by hand ${b.usage.prompt_tokens}`);
  assert.equal(a.usage.prompt_tokens, b.usage.prompt_tokens);
});

test('anthropic: system messages inside messages are accepted and rendered like a folded user part', async () => {
  const messages = [{ role: 'user', content: 'hello' }, { role: 'system', content: 'be brief' }];
  const r = await anthropic.messages.create({ model: 'deepseek-chat', max_tokens: 4, messages });
  assert.equal(r.type, 'message');
  const a = await anthropic.messages.countTokens({ model: 'deepseek-chat', messages });
  const b = await anthropic.messages.countTokens({
    model: 'deepseek-chat',
    messages: [{ role: 'user', content: [{ type: 'text', text: 'hello' }, { type: 'text', text: 'be brief' }] }],
  });
  console.log(`     input_tokens ${a.input_tokens} vs ${b.input_tokens}`);
  assert.equal(a.input_tokens, b.input_tokens);
});

// ---- model ids

test('openai: /v1/models lists every accepted id with its context length', async () => {
  const list = await openai.models.list();
  const ids = list.data.map((m) => m.id);
  console.log(`     ids ${ids.join(', ')}`);
  for (const id of ['deepseek-v4-flash', 'deepseek-chat', 'deepseek-reasoner']) assert.ok(ids.includes(id), id);
  assert.ok(list.data.every((m) => m.context_length === 8192));
});

test('openai: an unknown model id is answered, and "model" says which model did', async () => {
  const r = await openai.chat.completions.create({
    model: 'gpt-4o', max_tokens: 2, messages: [{ role: 'user', content: 'scripted words' }],
  });
  assert.equal(r.model, 'deepseek-v4-flash');
});

test('raw: an unknown request field is a 400 naming it', async () => {
  const r = await raw('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], logit_bias: { 1: 2 } });
  assert.equal(r.status, 400);
  assert.match(r.body.error.message, /logit_bias/);
});

// ---- tool_choice and parallel_tool_calls

test('openai: tool_choice naming a tool makes the reply call it (tiny model, unscripted)', async () => {
  const r = await openai.chat.completions.create({
    model: 'deepseek-chat', max_tokens: 40, tools, tool_choice: { type: 'function', function: { name: 'get_time' } },
    messages: [{ role: 'user', content: 'whatever you like' }],
  });
  const calls = r.choices[0].message.tool_calls ?? [];
  console.log(`     calls: ${calls.map((c) => c.function.name).join(', ')}`);
  assert.equal(calls[0]?.function.name, 'get_time');
});

test('openai: tool_choice "required" makes the reply call one of the tools', async () => {
  const stream = await openai.chat.completions.create({
    model: 'deepseek-chat', max_tokens: 40, tools, tool_choice: 'required', stream: true,
    messages: [{ role: 'user', content: 'anything at all' }],
  });
  let name = null;
  for await (const chunk of stream) name = chunk.choices[0]?.delta?.tool_calls?.[0]?.function?.name ?? name;
  console.log(`     streamed call name: ${name}`);
  assert.ok(['get_weather', 'get_time'].includes(name));
});

test('openai: parallel_tool_calls false keeps one call; the default keeps both', async () => {
  const ask = (extra) => openai.chat.completions.create({
    model: 'deepseek-chat', tools, messages: [{ role: 'user', content: 'two calls please' }], ...extra,
  });
  const one = await ask({ parallel_tool_calls: false });
  const both = await ask({});
  console.log(`     calls: ${one.choices[0].message.tool_calls.length} with false, ${both.choices[0].message.tool_calls.length} by default`);
  assert.equal(one.choices[0].message.tool_calls.length, 1);
  assert.equal(one.choices[0].message.tool_calls[0].function.arguments, '{"location": "Rome"}');
  assert.equal(both.choices[0].message.tool_calls.length, 2);
});

test('anthropic: tool_choice {type: tool} forces that tool', async () => {
  const r = await anthropic.messages.create({
    model: 'deepseek-chat', max_tokens: 40, tool_choice: { type: 'tool', name: 'get_weather' },
    tools: [{ name: 'get_weather', input_schema: { type: 'object', properties: {} } },
      { name: 'get_time', input_schema: { type: 'object', properties: {} } }],
    messages: [{ role: 'user', content: 'say something' }],
  });
  const uses = r.content.filter((b) => b.type === 'tool_use');
  assert.equal(uses[0]?.name, 'get_weather');
});

test('raw: tool_choice naming an undeclared tool is a 400 naming it', async () => {
  const r = await raw('/v1/chat/completions', {
    messages: [{ role: 'user', content: 'x' }], tools, tool_choice: { type: 'function', function: { name: 'nope' } },
  });
  assert.equal(r.status, 400);
  assert.match(r.body.error.message, /tool_choice.*nope/);
});

// ---- JSON replies

test('openai: response_format json_object gives a JSON object even from a random model', async () => {
  for (const max_tokens of [8, 40]) {
    const r = await openai.chat.completions.create({
      model: 'deepseek-chat', max_tokens, response_format: { type: 'json_object' },
      messages: [{ role: 'user', content: 'reply in JSON' }],
    });
    const text = r.choices[0].message.content;
    console.log(`     max_tokens ${max_tokens}: ${JSON.stringify(text).slice(0, 80)} (${r.choices[0].finish_reason})`);
    const v = JSON.parse(text);
    assert.equal(typeof v, 'object');
    assert.ok(v !== null && !Array.isArray(v));
  }
});

test('openai: json_schema is shown to the model (Response Format section) and the reply is JSON', async () => {
  const schema = { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] };
  const plain = await openai.chat.completions.create({
    model: 'deepseek-chat', max_tokens: 20, messages: [{ role: 'user', content: 'reply in JSON' }],
    response_format: { type: 'json_object' },
  });
  const r = await openai.chat.completions.create({
    model: 'deepseek-chat', max_tokens: 20, messages: [{ role: 'user', content: 'reply in JSON' }],
    response_format: { type: 'json_schema', json_schema: { name: 'city', schema } },
  });
  console.log(`     prompt_tokens ${plain.usage.prompt_tokens} -> ${r.usage.prompt_tokens} with the schema`);
  assert.ok(r.usage.prompt_tokens > plain.usage.prompt_tokens + 10);
  JSON.parse(r.choices[0].message.content);
});

test('responses: text.format json_object gives JSON', async () => {
  const r = await openai.responses.create({
    model: 'deepseek-chat', max_output_tokens: 16, input: 'reply in JSON', text: { format: { type: 'json_object' } },
  });
  JSON.parse(r.output_text);
});

test('anthropic: output_config.format json_schema gives JSON; an unknown output_config key is a 400', async () => {
  const r = await anthropic.messages.create({
    model: 'deepseek-chat', max_tokens: 16, messages: [{ role: 'user', content: 'reply in JSON' }],
    output_config: { format: { type: 'json_schema', schema: { type: 'object' } } },
  });
  JSON.parse(r.content.filter((b) => b.type === 'text').map((b) => b.text).join(''));
  await assert.rejects(anthropic.messages.create({
    model: 'deepseek-chat', max_tokens: 4, messages: [{ role: 'user', content: 'x' }],
    output_config: { verbosity: 'low' },
  }), (err) => err.status === 400 && /output_config\.verbosity/.test(err.message));
});

// ---- logprobs and penalties

test('openai: logprobs are real: one per answer token, <= 0, top_logprobs sorted and bounding', async () => {
  const r = await openai.chat.completions.create({
    model: 'deepseek-chat', logprobs: true, top_logprobs: 3, messages: [{ role: 'user', content: 'scripted words' }],
  });
  const lp = r.choices[0].logprobs.content;
  const text = Buffer.concat(lp.map((t) => Buffer.from(t.bytes))).toString('utf8');
  console.log(`     ${lp.length} tokens, first logprob ${lp[0].logprob}, top ${lp[0].top_logprobs.map((t) => t.logprob).join(' ')}`);
  assert.equal(text, r.choices[0].message.content);
  for (const t of lp) {
    assert.ok(t.logprob <= 0);
    assert.equal(t.top_logprobs.length, 3);
    for (let k = 1; k < 3; k++) assert.ok(t.top_logprobs[k].logprob <= t.top_logprobs[k - 1].logprob);
    assert.ok(t.logprob <= t.top_logprobs[0].logprob + 1e-6);
  }
});

test('raw: logprobs with stream is a 400 naming logprobs', async () => {
  const r = await raw('/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], logprobs: true, stream: true });
  assert.equal(r.status, 400);
  assert.match(r.body.error.message, /logprobs/);
});

// The tiny model's greedy text never repeats a token, so a positive penalty
// has nothing to act on; a negative one (allowed: -2..2) must make it repeat.
test('openai: presence/frequency penalties act on greedy decoding (negative ones make it repeat)', async () => {
  const ask = (extra) => openai.chat.completions.create({
    model: 'deepseek-chat', temperature: 0, max_tokens: 24, logprobs: true,
    messages: [{ role: 'user', content: 'say anything you like' }], ...extra,
  });
  const distinct = (r) => new Set(r.choices[0].logprobs.content.map((t) => t.bytes.join(','))).size;
  const plain = await ask({});
  const pen = await ask({ presence_penalty: -2, frequency_penalty: -2 });
  console.log(`     distinct tokens in 24: ${distinct(plain)} plain, ${distinct(pen)} with penalties -2`);
  assert.notEqual(plain.choices[0].message.content, pen.choices[0].message.content);
  assert.ok(distinct(pen) < distinct(plain));
});

// ---- Responses tools

test('responses: a custom tool is called with a custom_tool_call carrying the free-form input', async () => {
  const r = await openai.responses.create({
    model: 'deepseek-chat', input: 'apply the patch',
    tools: [{ type: 'custom', name: 'apply_patch', description: 'Apply a patch' }],
  });
  const item = r.output.find((o) => o.type === 'custom_tool_call');
  console.log(`     output types: ${r.output.map((o) => o.type).join(', ')}`);
  assert.ok(item);
  assert.equal(item.name, 'apply_patch');
  assert.equal(item.input, PATCH);
});

test('responses: a namespace tool is called with its namespace and inner name', async () => {
  const r = await openai.responses.create({
    model: 'deepseek-chat', input: 'close the agent',
    tools: [{ type: 'namespace', name: 'multi_agent_v1', description: 'agents',
      tools: [{ type: 'function', name: 'close_agent', parameters: { type: 'object', properties: { target: { type: 'string' } } } }] }],
  });
  const item = r.output.find((o) => o.type === 'function_call');
  console.log(`     call: ${item?.namespace}/${item?.name} ${item?.arguments}`);
  assert.equal(item.name, 'close_agent');
  assert.equal(item.namespace, 'multi_agent_v1');
  assert.equal(item.arguments, '{"target": "a1"}');
});

test('responses: a hosted tool (web_search) is a 400 naming it, not a silent drop', async () => {
  const r = await raw('/v1/responses', { input: 'x', tools: [{ type: 'web_search' }] });
  assert.equal(r.status, 400);
  assert.match(r.body.error.message, /web_search/);
});

let passed = 0;
let failed = 0;
for (const t of tests) {
  try {
    await t.f();
    passed++;
    console.log(`ok   ${t.name}`);
  } catch (err) {
    failed++;
    console.log(`FAIL ${t.name}: ${err.message.split('\n')[0]}`);
  }
}
server.kill('SIGTERM');
await new Promise((r) => server.on('exit', r));
fs.rmSync(tmp, { recursive: true, force: true });
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
