"""Property tests (hypothesis) for the TLC operator: the cumulative-sum local mean equals the direct
avg_pool2d + replicate-pad form for any map and window shape, in its symbolic and constant forms."""

from __future__ import annotations

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tlc import reference_local_mean

from nafnet_core.tlc import local_mean


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 70), w=st.integers(1, 70), kh=st.integers(1, 80), kw=st.integers(1, 80),
       c=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_local_mean_equals_direct_form(h, w, kh, kw, c, seed):
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(seed)) * 3
    out = local_mean(x, (kh, kw))
    torch.testing.assert_close(out.expand_as(x), reference_local_mean(x, (kh, kw)), atol=1e-5, rtol=0)


@functools.cache
def _exported(k: int):
    """local_mean exported once with symbolic H and W (as the dynamic ONNX export traces it)."""

    class Pool(torch.nn.Module):
        def forward(self, x):
            return local_mean(x, (k, k))

    dims = {"x": {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    return torch.export.export(Pool(), (torch.randn(1, 2, 41, 43),), dynamic_shapes=dims).module()


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([3, 24]), data=st.data())
def test_symbolic_form_equals_constant_form(k, data):
    # Traced once at 41x43 with symbolic sizes; must be right at any other size above the window.
    # (torch.export specialises symbolic sizes away from 1, so its program guards out maps no larger
    # than the window; the ONNX graphs, which drop such guards, are checked at those sizes in the
    # export tests, e.g. 37x53 where the deep levels are smaller than their kernels.)
    h, w = data.draw(st.integers(k + 1, 60)), data.draw(st.integers(k + 1, 60))
    x = torch.randn(1, 2, h, w)
    torch.testing.assert_close(_exported(k)(x), reference_local_mean(x, (k, k)), atol=1e-5, rtol=0)
