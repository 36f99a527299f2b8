// The Node.js cassandra-driver against a coalesce emulator: connect, write, read back.
//
//   node tests/node/check.js HOST PORT
//
// Prints one JSON line ({"rows": [...], "protocolVersion": N}) and exits 0, or
// prints the error and exits 1. Run by tests/emulator/test_emulator_node_driver.py
// after `npm ci --prefix tests/node`.
"use strict";

const cassandra = require("cassandra-driver");

async function main(host, port) {
  const client = new cassandra.Client({
    contactPoints: [host],
    localDataCenter: "datacenter1",
    protocolOptions: { port, maxVersion: 4 },
    socketOptions: { connectTimeout: 5000, readTimeout: 10000 },
  });
  try {
    await client.connect();
    await client.execute(
      "CREATE KEYSPACE IF NOT EXISTS nodeks WITH replication = " +
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    );
    await client.execute("CREATE TABLE IF NOT EXISTS nodeks.kv (k int PRIMARY KEY, v text)");
    const insert = "INSERT INTO nodeks.kv (k, v) VALUES (?, ?)";
    const select = "SELECT v FROM nodeks.kv WHERE k = ?";
    const rows = [];
    for (let k = 0; k < 20; k++) {
      await client.execute(insert, [k, `v${k}`], { prepare: true });
    }
    for (let k = 0; k < 20; k++) {
      const result = await client.execute(select, [k], { prepare: true });
      rows.push(result.first().v);
    }
    const protocolVersion = client.controlConnection.protocolVersion;
    process.stdout.write(JSON.stringify({ rows, protocolVersion }) + "\n");
  } finally {
    await client.shutdown();
  }
}

const [host, port] = process.argv.slice(2);
main(host, Number(port)).catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
