// A Node.js client of rankstream: it loads protos/rankstream/v1/rankstream.proto directly (the
// contract) and calls a running server. Usage: node client.mjs HOST:PORT [TOKEN]
// The bearer token comes from the argument, else from RANKSTREAM_TOKEN; it is sent on every call
// as `authorization: Bearer <token>`.
// Prints one JSON object with what it saw; the Python test suite checks it.
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const require = createRequire(import.meta.url);
const here = path.dirname(fileURLToPath(import.meta.url));
const protos = path.resolve(here, "../../protos");
const healthProto = path.join(path.dirname(require.resolve("grpc-health-check/package.json")), "proto/health/v1/health.proto");

const options = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };
const definition = protoLoader.loadSync("rankstream/v1/rankstream.proto", { ...options, includeDirs: [protos] });
const rankstream = grpc.loadPackageDefinition(definition).rankstream.v1;
const RerankStats = definition["rankstream.v1.RerankStats"];
const health = grpc.loadPackageDefinition(protoLoader.loadSync(healthProto, options)).grpc.health.v1;

const target = process.argv[2];
const token = process.argv[3] || process.env.RANKSTREAM_TOKEN || "";
const auth = new grpc.Metadata();
if (token) auth.set("authorization", `Bearer ${token}`);
const credentials = grpc.credentials.createInsecure();
const deadline = () => new Date(Date.now() + 30_000);

// Each stream message is a ScoredPassages: a batch of passages. The call's RerankStats come in
// the trailing metadata "rankstream-stats-bin" (serialized bytes), with the status.
function collect(call) {
  return new Promise((resolve, reject) => {
    const batches = [];
    let ended = false;
    let status = null;
    const finish = () => {
      if (!ended || status === null) return;
      const [stats] = status.metadata.get("rankstream-stats-bin");
      resolve({ batches, passages: batches.flat(), stats: stats ? RerankStats.deserialize(stats) : null });
    };
    call.on("data", (message) => batches.push(message.passages));
    call.on("error", reject);
    call.on("end", () => {
      ended = true;
      finish();
    });
    call.on("status", (received) => {
      status = received;
      finish();
    });
  });
}

const reranker = new rankstream.Reranker(target, credentials);
const retriever = new rankstream.Retriever(target, credentials);
const healthClient = new health.Health(target, credentials);

const healthStatus = await new Promise((resolve, reject) =>
  healthClient.Check({ service: "rankstream.v1.Reranker" }, { deadline: deadline() }, (error, response) =>
    error ? reject(error) : resolve(response.status),
  ),
);

const query = "How do I keep a chatbot from citing irrelevant passages?";
const passages = [
  { id: "food", text: "Simmer roasted bones with onion, carrot and celery." },
  { id: "rag", text: "Drop retrieved passages whose relevance score falls below a threshold." },
];

const reranked = await collect(
  reranker.Rerank({ query, passages, model: "minilm", return_text: true }, auth, { deadline: deadline() }),
);

const manyPassages = Array.from({ length: 24 }, (_, i) => ({ id: `p${i}`, text: `${passages[i % 2].text} (${i})` }));
const asScored = await collect(
  reranker.Rerank({ query, passages: manyPassages, model: "tiny-bert", order: "AS_SCORED" }, auth, { deadline: deadline() }),
);

const retrieved = await collect(
  retriever.Retrieve({ query: "what should I do with leftover bones", top_k: 3, return_text: true }, auth, { deadline: deadline() }),
);

// Hybrid mode: BM25 and dense candidates fused; each passage says where each side ranked it.
const hybrid = await collect(
  retriever.Retrieve({ query: "leftover bones stock", top_k: 3, mode: "HYBRID" }, auth, { deadline: deadline() }),
);

let invalid;
try {
  await collect(reranker.Rerank({ query: "", passages: [{ id: "x", text: "x" }] }, auth, { deadline: deadline() }));
  invalid = { code: "OK" };
} catch (error) {
  invalid = { code: grpc.status[error.code], details: error.details };
}

// Without the token (only checked when a token was given): the server must refuse the call.
let withoutToken = null;
if (token) {
  try {
    await collect(reranker.Rerank({ query: "q", passages: [{ id: "x", text: "x" }] }, { deadline: deadline() }));
    withoutToken = { code: "OK" };
  } catch (error) {
    withoutToken = { code: grpc.status[error.code], details: error.details };
  }
}

const shape = ({ batches, passages: all, stats }) => ({ messages: batches.length, passages: all, stats });
console.log(
  JSON.stringify({
    health: healthStatus,
    reranked: shape(reranked),
    as_scored: shape(asScored),
    retrieved: shape(retrieved),
    hybrid: shape(hybrid),
    invalid,
    without_token: withoutToken,
  }),
);
for (const client of [reranker, retriever, healthClient]) client.close();
