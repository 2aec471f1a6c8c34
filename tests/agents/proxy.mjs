// tests/agents/proxy.mjs LISTEN_PORT TARGET_PORT DIR -- a recording proxy.
//
// Forwards every HTTP request to 127.0.0.1:TARGET_PORT unchanged and writes
// each request (method, path, headers, body) to DIR/NNN.json, so that
// tests/agents/run.sh can show which fields each agent really sends. The
// reply is streamed back as it arrives. Listens on 127.0.0.1 only.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';

const [listenPort, targetPort, dir] = process.argv.slice(2);
let n = 0;

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    const seq = String(++n).padStart(3, '0');
    let parsed = null;
    try { parsed = body.length ? JSON.parse(body.toString('utf8')) : null; } catch { parsed = null; }
    fs.writeFileSync(path.join(dir, `${seq}.json`), JSON.stringify(
      { method: req.method, url: req.url, headers: req.headers, body: parsed ?? body.toString('utf8') }, null, 1));
    const headers = { ...req.headers, host: `127.0.0.1:${targetPort}` };
    delete headers['transfer-encoding'];
    headers['content-length'] = String(body.length);
    const up = http.request({ host: '127.0.0.1', port: Number(targetPort), method: req.method, path: req.url, headers },
      (ur) => {
        res.writeHead(ur.statusCode, ur.headers);
        ur.pipe(res);
      });
    up.on('error', (e) => {
      // A reply the proxy's own HTTP client rejects (a HEAD answered with a
      // body, say) ends the client's connection rather than the proxy.
      fs.appendFileSync(path.join(dir, 'proxy-errors.txt'), `${seq} ${req.method} ${req.url}: ${e.message}\n`);
      if (res.headersSent) { res.destroy(); return; }
      res.writeHead(502, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: `proxy: ${e.message}` } }));
    });
    // A client that leaves must free the server too (it stops generating
    // when its socket closes), so the upstream request goes with it.
    res.on('close', () => { if (!res.writableFinished) up.destroy(); });
    up.end(body);
  });
});
server.listen(Number(listenPort), '127.0.0.1');
