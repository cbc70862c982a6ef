// Chat through the official openai npm package: a whole answer, a stream put back together,
// the SDK's own stream helper, and an error. Prints one JSON object for the pytest side.
//
//   KVRELAY_BASE_URL=http://127.0.0.1:P KVRELAY_API_KEY=... KVRELAY_REQUEST='{"model":...}' \
//     node chat.mjs
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: `${process.env.KVRELAY_BASE_URL}/v1`,
  apiKey: process.env.KVRELAY_API_KEY,
  maxRetries: 0,
  timeout: 60_000,
});
const request = JSON.parse(process.env.KVRELAY_REQUEST);

function fromMessage(choice) {
  const message = choice.message;
  return {
    content: message.content ?? null,
    reasoning: message.reasoning_content ?? null,
    calls: (message.tool_calls ?? []).map((c) => [c.type, c.function.name, c.function.arguments]),
    finish_reason: choice.finish_reason,
  };
}

const whole = await client.chat.completions.create({ ...request, stream: false });

const stream = await client.chat.completions.create({
  ...request,
  stream: true,
  stream_options: { include_usage: true },
});
let content = "";
let reasoning = "";
let finish = null;
let usage = null;
let chunks = 0;
const calls = [];
const callIds = [];
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.usage) usage = chunk.usage;
  const choice = chunk.choices[0];
  if (!choice) continue;
  content += choice.delta.content ?? "";
  reasoning += choice.delta.reasoning_content ?? "";
  for (const call of choice.delta.tool_calls ?? []) {
    if (calls[call.index] === undefined) {
      calls[call.index] = [call.type, call.function.name, ""];
      callIds[call.index] = call.id;
    }
    calls[call.index][2] += call.function.arguments ?? "";
  }
  finish = choice.finish_reason ?? finish;
}

const helper = await client.chat.completions.stream({ ...request }).finalChatCompletion();

let error = null;
try {
  await client.chat.completions.create({ ...request, max_tokens: 0 });
} catch (e) {
  error = { status: e.status, body: e.error ?? null, is_bad_request: e instanceof OpenAI.BadRequestError };
}

console.log(
  JSON.stringify({
    whole: fromMessage(whole.choices[0]),
    streamed: {
      content: content || null,
      reasoning: reasoning || null,
      calls,
      finish_reason: finish,
    },
    stream_call_ids: callIds,
    stream_chunks: chunks,
    stream_usage: usage,
    helper: fromMessage(helper.choices[0]),
    error,
  }),
);
