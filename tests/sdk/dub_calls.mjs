// Drives Dub's TypeScript SDK (npm "dub"), unchanged, against an edge for
// tests/test_dub_sdk.py: reads {"calls": [{server, token, op, body}]} on stdin and prints
// one result per call: {ok: true, value} with what the SDK parsed, or {ok: false, error,
// status, code} with the error it threw (its class name, the HTTP status, Dub's code).
import { Dub } from "dub";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const { calls } = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const results = [];
for (const call of calls) {
  const dub = new Dub({ token: call.token, serverURL: call.server });
  try {
    const value = call.op === "lead" ? await dub.track.lead(call.body) : await dub.track.sale(call.body);
    results.push({ ok: true, value });
  } catch (e) {
    results.push({
      ok: false,
      error: e?.name ?? String(e),
      status: e?.statusCode ?? null,
      code: e?.error?.code ?? null,
      message: String(e?.message ?? e).slice(0, 500),
    });
  }
}
process.stdout.write(JSON.stringify(results));
