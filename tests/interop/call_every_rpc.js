#!/usr/bin/env node
// A Node.js client of vae.v1.VaeService built from the .proto alone: the .proto is loaded at
// run time with @grpc/proto-loader (no generated code, nothing from the Python packages), and
// every RPC is called with tensors built here as little-endian, row-major bytes.
//
//   npm ci && node call_every_rpc.js HOST:PORT PROTO_PATH
//
// Prints one JSON object on stdout: what each call returned (tensors as dtype, shape and the
// base64 of their raw bytes; scores as arrays), the inputs it sent, and the status of the
// deliberately bad requests. tests/test_interop_node.py compares it with the Python client.
// Exits 1 (after printing what it has) if a call that should succeed fails.
'use strict';

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const healthProtoPath = require('grpc-health-check').protoPath; // the standard health.proto

const [target, protoPath] = process.argv.slice(2);
if (!target || !protoPath) {
  process.stderr.write('usage: node call_every_rpc.js HOST:PORT PROTO_PATH\n');
  process.exit(2);
}

// keepCase: the .proto's field names as written; longs: uint64 as decimal strings (a seed or
// an offset may exceed 2^53); enums: names ('FLOAT32', 'UINT8').
const LOAD_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const vae = grpc.loadPackageDefinition(protoLoader.loadSync(protoPath, LOAD_OPTIONS)).vae.v1;
const health = grpc.loadPackageDefinition(
  protoLoader.loadSync(healthProtoPath, LOAD_OPTIONS)).grpc.health.v1;

// The server accepts and sends messages up to 64 MiB (ModelInfo.limits.max_message_bytes);
// grpc-js receives 4 MiB by default.
const MAX_MESSAGE = 64 * 1024 * 1024;
const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': MAX_MESSAGE,
  'grpc.max_send_message_length': MAX_MESSAGE,
};
const credentials = grpc.credentials.createInsecure();
const client = new vae.VaeService(target, credentials, CHANNEL_OPTIONS);
const healthClient = new health.Health(target, credentials);

const ITEM_SIZE = { FLOAT32: 4, UINT8: 1 };
const DEADLINE_MS = 15000;
const SEED = '12345678901234567890'; // a uint64 above 2^63: sent as a decimal string

// -- tensors: little-endian, row-major bytes with an explicit shape ----------------------------

function float32Tensor(shape, values) {
  const data = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => data.writeFloatLE(v, 4 * i));
  return { dtype: 'FLOAT32', shape, data };
}

function uint8Tensor(shape, values) {
  return { dtype: 'UINT8', shape, data: Buffer.from(values) };
}

// A Tensor from a reply: check that its byte length agrees with dtype and shape.
function checked(tensor, name) {
  if (!tensor) throw new Error(`${name}: missing from the reply`);
  const shape = tensor.shape.map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  if (!(tensor.dtype in ITEM_SIZE) || count * ITEM_SIZE[tensor.dtype] !== tensor.data.length) {
    throw new Error(`${name}: ${tensor.data.length} bytes do not fit ${tensor.dtype} ${shape}`);
  }
  return { dtype: tensor.dtype, shape, data: tensor.data };
}

function float32Values(tensor) {
  const out = new Array(tensor.data.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = tensor.data.readFloatLE(4 * i);
  return out;
}

function asJson(tensor) {
  return { dtype: tensor.dtype, shape: tensor.shape, data_b64: tensor.data.toString('base64') };
}

// -- calls ---------------------------------------------------------------------------------

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

function unary(stub, method, request) {
  return new Promise((resolve, reject) => {
    stub[method](request, { deadline: deadline() }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function serverStream(method, request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = client[method](request, { deadline: deadline() });
    call.on('data', (chunk) => chunks.push(chunk));
    call.on('error', reject);
    call.on('end', () => resolve(chunks));
  });
}

// A call that must fail: its status code and details.
async function failing(rpc, request) {
  try {
    await unary(client, rpc, request);
  } catch (err) {
    return { rpc, code: err.code, code_name: grpc.status[err.code], details: err.details };
  }
  return { rpc, code: 0, code_name: 'OK', details: 'the call succeeded but should have failed' };
}

// -- inputs, built here ---------------------------------------------------------------------

// N rings of radius 5 + i around the centre, with integer arithmetic only, so that another
// language can rebuild the same pixels: v = max(0, 255 - 8 |(r-14)^2 + (c-14)^2 - R^2|).
function ringPixels(n) {
  const pixels = [];
  for (let i = 0; i < n; i++) {
    const radius = 5 + i;
    for (let r = 0; r < 28; r++) {
      for (let c = 0; c < 28; c++) {
        const d2 = (r - 14) * (r - 14) + (c - 14) * (c - 14);
        pixels.push(Math.max(0, 255 - 8 * Math.abs(d2 - radius * radius)));
      }
    }
  }
  return pixels;
}

// z[i][j] = (i * k + j - 5) / 4: exact in float32.
function latentValues(n, k) {
  const values = [];
  for (let i = 0; i < n; i++) for (let j = 0; j < k; j++) values.push((i * k + j - 5) / 4);
  return values;
}

async function main() {
  const out = { seeds: { encode: 7, sample: SEED, log_likelihood: 11 } };

  // grpc.health.v1: the standard health service, from grpc-node's copy of health.proto.
  out.health = {};
  for (const service of ['', 'vae.v1.VaeService']) {
    out.health[service] = (await unary(healthClient, 'Check', { service })).status;
  }

  const info = await unary(client, 'GetModelInfo', {});
  const k = info.latent_dim;
  out.model_info = {
    model_version: info.model_version,
    latent_dim: k,
    likelihood: info.likelihood,
    sigma: info.sigma,
    image_shape: info.image_shape,
    execution_provider: info.execution_provider,
    batching: info.batching,
    limits: info.limits, // uint64 fields arrive as decimal strings
    anomaly_percentile: info.anomaly_percentile,
    manifest_model_version: JSON.parse(info.manifest_json).model_version,
  };

  // Images: UINT8 [N, 28, 28], and the same pixels as FLOAT32 [N, 784] = y / 255.
  const n = 4;
  const u8 = ringPixels(n);
  const imagesU8 = uint8Tensor([n, 28, 28], u8);
  const imagesF32 = float32Tensor([n, 784], u8.map((v) => v / 255));
  const z = float32Tensor([3, k], latentValues(3, k));
  out.inputs = { images_u8: asJson(imagesU8), images_f32: asJson(imagesF32), z: asJson(z) };

  // Encode, both dtypes and shapes, with a seeded sample z ~ q(z|x).
  out.encode = {};
  for (const [name, images] of [['f32', imagesF32], ['u8', imagesU8]]) {
    const reply = await unary(client, 'Encode', { images, sample: true, seed: out.seeds.encode });
    const mu = checked(reply.mu, 'mu');
    const logvar = checked(reply.logvar, 'logvar');
    const zs = checked(reply.z, 'z');
    out.encode[name] = { mu: asJson(mu), logvar: asJson(logvar), z: asJson(zs),
      mu_values: float32Values(mu) };
  }

  // Decode, FLOAT32 (the default) and UINT8 images.
  out.decode = {};
  for (const dtype of ['FLOAT32', 'UINT8']) {
    const reply = await unary(client, 'Decode', { z, output_dtype: dtype });
    out.decode[dtype] = asJson(checked(reply.images, 'images'));
  }

  // Sample from the prior, with a uint64 seed above 2^63.
  out.sample = {};
  for (const dtype of ['FLOAT32', 'UINT8']) {
    const reply = await unary(client, 'Sample',
      { n: 10, seed: SEED, output_dtype: dtype, return_latents: dtype === 'FLOAT32' });
    out.sample[dtype] = { images: asJson(checked(reply.images, 'images')) };
    if (reply.latents) out.sample[dtype].latents = asJson(checked(reply.latents, 'latents'));
  }

  // SampleStream: 10 images in chunks of 4 (offsets 0, 4, 8), then a resumed stream from 6.
  out.stream = {};
  for (const [name, request] of [
    ['whole', { n: 10, seed: SEED, chunk_size: 4, output_dtype: 'FLOAT32', offset: 0 }],
    ['resumed_u8', { n: 10, seed: SEED, chunk_size: 4, output_dtype: 'UINT8', offset: 6 }],
  ]) {
    const chunks = (await serverStream('SampleStream', request)).map((c) => ({
      offset: Number(c.offset), images: checked(c.images, 'images') }));
    let expected = request.offset;
    for (const c of chunks) {
      if (c.offset !== expected) throw new Error(`SampleStream: chunk at ${c.offset}, expected ${expected}`);
      expected += c.images.shape[0];
    }
    if (expected !== request.n) throw new Error(`SampleStream: ended at ${expected} of ${request.n}`);
    out.stream[name] = {
      chunks: chunks.map((c) => ({ offset: c.offset, shape: c.images.shape })),
      images: asJson({ dtype: chunks[0].images.dtype, shape: [expected - request.offset, 28, 28],
        data: Buffer.concat(chunks.map((c) => c.images.data)) }),
    };
  }

  // LogLikelihood with K = 50: UINT8 images (dequantised with the seed) and FLOAT32 images.
  out.log_likelihood = {};
  for (const [name, images] of [['u8', imagesU8], ['f32', imagesF32]]) {
    const r = await unary(client, 'LogLikelihood', { images, k: 50, seed: out.seeds.log_likelihood });
    out.log_likelihood[name] = { elbo: r.elbo, log_likelihood: r.log_likelihood,
      bits_per_dim: r.bits_per_dim, percentile: r.percentile, anomaly: r.anomaly, k: r.k };
  }

  // Bad requests: the status code and the details that name the field.
  const shortZ = { ...float32Tensor([2, k], latentValues(2, k)) };
  shortZ.data = shortZ.data.subarray(0, shortZ.data.length - 4);
  out.errors = [
    await failing('Decode', { z: shortZ }),
    await failing('Sample', { n: 0, seed: 1 }),
  ];
  return out;
}

main()
  .then((out) => {
    process.stdout.write(JSON.stringify(out) + '\n');
    client.close();
    healthClient.close();
  })
  .catch((err) => {
    process.stdout.write(JSON.stringify({ fatal: String(err && err.stack ? err.stack : err),
      code: err && err.code, details: err && err.details }) + '\n');
    process.exitCode = 1;
    client.close();
    healthClient.close();
  });
