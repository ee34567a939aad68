// A Node.js client of rankstream: it loads protos/rankstream/v1/rankstream.proto directly (the
// contract) and calls a running server. Usage: node client.mjs HOST:PORT
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
const rankstream = grpc.loadPackageDefinition(
  protoLoader.loadSync("rankstream/v1/rankstream.proto", { ...options, includeDirs: [protos] }),
).rankstream.v1;
const health = grpc.loadPackageDefinition(protoLoader.loadSync(healthProto, options)).grpc.health.v1;

const target = process.argv[2];
const credentials = grpc.credentials.createInsecure();
const deadline = () => new Date(Date.now() + 30_000);

function collect(call) {
  return new Promise((resolve, reject) => {
    const results = [];
    call.on("data", (message) => results.push(message));
    call.on("error", reject);
    call.on("end", () => resolve(results));
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

const reranked = await collect(
  reranker.Rerank(
    {
      query: "How do I keep a chatbot from citing irrelevant passages?",
      passages: [
        { id: "food", text: "Simmer roasted bones with onion, carrot and celery." },
        { id: "rag", text: "Drop retrieved passages whose relevance score falls below a threshold." },
      ],
      model: "minilm",
      return_text: true,
    },
    { deadline: deadline() },
  ),
);

const retrieved = await collect(
  retriever.Retrieve({ query: "what should I do with leftover bones", top_k: 3, return_text: true }, { deadline: deadline() }),
);

let invalid;
try {
  await collect(reranker.Rerank({ query: "", passages: [{ id: "x", text: "x" }] }, { deadline: deadline() }));
  invalid = { code: "OK" };
} catch (error) {
  invalid = { code: grpc.status[error.code], details: error.details };
}

console.log(JSON.stringify({ health: healthStatus, reranked, retrieved, invalid }));
for (const client of [reranker, retriever, healthClient]) client.close();
