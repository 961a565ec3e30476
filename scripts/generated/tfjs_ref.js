// Reference run of an UpscalerJS layers model with pure @tensorflow/tfjs (CPU backend) on a raw
// float32 NHWC input file; used by verify_port.py to check the PyTorch port (tfjs_keras_torch.py).
// usage: NODE_PATH=OUT_DIR/node_modules node tfjs_ref.js <pkgdir> <model.json relative> <in.f32> <H> <W> <out.f32>
// (NODE_PATH: the packages live in OUT_DIR, not next to this script)
const tf = require('@tensorflow/tfjs');
const fs = require('fs'); const path = require('path');
async function main() {
  const [pkg, rel, inF, H, W, outF] = process.argv.slice(2);
  await tf.setBackend('cpu');
  // register custom layers (MultiplyBeta, PixelShuffleNx) exactly as the package does
  const shared = require(path.join(pkg, 'dist/cjs/packages/shared/src/esrgan/esrgan.js'));
  const m = /x(\d)/.exec(rel); const scale = rel.includes('gans') ? 4 : (m ? +m[1] : 2);
  const def = shared.getESRGANModelDefinition({scale, name: 'x', version: '0', meta: {architecture: 'rrdn'}});
  def.setup(tf);
  const mj = JSON.parse(fs.readFileSync(path.join(pkg, rel)));
  const dir = path.dirname(path.join(pkg, rel));
  const specs = [], bufs = [];
  for (const g of mj.weightsManifest) { specs.push(...g.weights); for (const p of g.paths) bufs.push(fs.readFileSync(path.join(dir, p))); }
  const all = Buffer.concat(bufs);
  const ab = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
  const model = await tf.loadLayersModel(tf.io.fromMemory({modelTopology: mj.modelTopology, weightSpecs: specs, weightData: ab}));
  const raw = fs.readFileSync(inF);
  const x = tf.tensor4d(new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), [1, +H, +W, 3]);
  const y = model.predict(x);
  fs.writeFileSync(outF, Buffer.from((await y.data()).buffer));
  console.log('out shape', y.shape.join(','));
}
main().catch(e => { console.error(e); process.exit(1); });
