// Where the Node.js cassandra-driver sends each partition of a ring of sidecars.
//
//   node tests/node/replicas.js HOST PORT KEYSPACE TABLE [--execute] < keys
//
// Reads int partition keys from stdin (whitespace-separated), connects to HOST:PORT
// and prints one JSON line:
//   {"hosts": ["127.0.0.2:9042", ...],                 every host the driver knows
//    "replicas": {"17": ["127.0.0.3:9042", ...], ...}, client.getReplicas per key
//    "executed": N}                                    reads sent with --execute
// With --execute it also runs the prepared `SELECT k FROM KEYSPACE.TABLE WHERE k = ?`
// once per key, through the driver's default (token-aware) load balancing policy,
// so the sidecars' metrics show where the reads arrived. Exits 1 on any error.
// Run by tests/sidecar/test_ring_drivers.py and benchmarks/ring_drivers.py after
// `npm ci --prefix tests/node`.
"use strict";

const cassandra = require("cassandra-driver");

function readStdin() {
  return new Promise((resolve, reject) => {
    let text = "";
    process.stdin.setEncoding("utf8");
    process.stdin.on("data", (chunk) => (text += chunk));
    process.stdin.on("end", () => resolve(text));
    process.stdin.on("error", reject);
  });
}

function routingKey(k) {
  const buffer = Buffer.alloc(4);
  buffer.writeInt32BE(k);
  return buffer;
}

async function main(host, port, keyspace, table, execute) {
  const keys = (await readStdin()).split(/\s+/).filter(Boolean).map(Number);
  const client = new cassandra.Client({
    contactPoints: [host],
    localDataCenter: "datacenter1",
    protocolOptions: { port, maxVersion: 4 },
    socketOptions: { connectTimeout: 5000, readTimeout: 10000 },
  });
  try {
    await client.connect();
    const replicas = {};
    for (const k of keys) {
      const hosts = client.getReplicas(keyspace, routingKey(k)) || [];
      replicas[k] = hosts.map((h) => h.address);
    }
    let executed = 0;
    if (execute) {
      const select = `SELECT k FROM ${keyspace}.${table} WHERE k = ?`;
      for (let at = 0; at < keys.length; at += 32) {
        const batch = keys.slice(at, at + 32);
        await Promise.all(batch.map((k) => client.execute(select, [k], { prepare: true })));
        executed += batch.length;
      }
    }
    const hosts = client.hosts.values().map((h) => h.address);
    process.stdout.write(JSON.stringify({ hosts, replicas, executed }) + "\n");
  } finally {
    await client.shutdown();
  }
}

const [host, port, keyspace, table, flag] = process.argv.slice(2);
main(host, Number(port), keyspace, table, flag === "--execute").catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
