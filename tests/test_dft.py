"""FFTs as real matrix products (nafnet_core.dft) against torch.fft, on odd, even and prime sizes."""

from __future__ import annotations

import pytest
import torch

from nafnet_core import dft


@pytest.mark.parametrize("h,w", [(1, 1), (1, 8), (7, 1), (8, 8), (13, 17), (16, 33), (64, 64), (31, 128)])
def test_rfft2_equals_torch(h, w):
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * 100 + w)) * 2 - 1
    ref = torch.fft.rfft2(x.double(), norm="backward")
    re, im = dft.rfft2(x)
    assert re.shape == ref.shape and re.dtype == torch.float32
    scale = ref.abs().max().item()  # the DC term: the window's sum
    assert (re.double() - ref.real).abs().max().item() <= 2e-6 * scale
    assert (im.double() - ref.imag).abs().max().item() <= 2e-6 * scale


@pytest.mark.parametrize("h,w", [(1, 1), (1, 8), (7, 1), (8, 8), (13, 17), (16, 33), (64, 64), (31, 128)])
def test_irfft2_equals_torch_on_any_spectrum(h, w):
    # A spectrum that is not the transform of a real map (non-zero imaginary DC and Nyquist columns):
    # torch drops those parts, and so must the matrix form.
    g = torch.Generator().manual_seed(h * 7 + w)
    spec = torch.complex(torch.randn(2, 3, h, w // 2 + 1, generator=g), torch.randn(2, 3, h, w // 2 + 1, generator=g))
    ref = torch.fft.irfft2(spec.to(torch.complex128), s=(h, w), norm="backward")
    out = dft.irfft2(spec.real, spec.imag, (h, w))
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max().item() <= 1e-6


def test_round_trip_and_exact_angles_for_large_sizes():
    # 5000 * 4999 is past 2**24: the angle's product and modulo are integers, so the matrix stays exact
    c, s = dft.cos_sin(4, 5000, 5000)
    k = torch.arange(5000, dtype=torch.float64)
    ref = torch.cos(2 * torch.pi * ((3 * k) % 5000) / 5000)
    assert (c[3].double() - ref).abs().max().item() < 1e-6
    x = torch.rand(1, 2, 24, 40)
    re, im = dft.rfft2(x)
    assert (dft.irfft2(re, im, (24, 40)) - x).abs().max().item() < 1e-5


class _FrequencySelection(torch.nn.Module):
    """x -> irfft2(relu(Re F) + i relu(Im F)): the frequency-selection image, a whole-image transform."""

    def forward(self, x):
        re, im = dft.rfft2(x)
        return dft.irfft2(torch.relu(re), torch.relu(im), tuple(x.shape[-2:]))


@pytest.mark.parametrize("dynamic", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_exports_without_dft_and_matches_in_onnxruntime(tmp_path, dynamic):
    import warnings

    import onnx
    import onnxruntime as ort

    model = _FrequencySelection()
    x = torch.rand(1, 3, 24, 36)
    kwargs = {}
    if dynamic:
        kwargs["dynamic_shapes"] = ({2: torch.export.Dim("h", min=2, max=4096),
                                     3: torch.export.Dim("w", min=2, max=4096)},)
    path = tmp_path / "fs.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=True, external_data=False, **kwargs)
    graph = onnx.load(path).graph
    ops = {n.op_type for n in graph.node}
    assert "DFT" not in ops and "STFT" not in ops
    elem_types = {v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    assert not elem_types & {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ([(1, 3, 24, 36)] + ([(1, 3, 17, 50)] if dynamic else [])):
        xi = torch.rand(*shape)
        spec = torch.fft.rfft2(xi.double())
        ref = torch.fft.irfft2(torch.complex(spec.real.relu(), spec.imag.relu()), s=shape[-2:])
        out = sess.run(None, {sess.get_inputs()[0].name: xi.numpy()})[0]
        assert abs(out - ref.numpy()).max() < 1e-5
