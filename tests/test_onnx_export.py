"""The exporter must not keep a module's weights alive after the export (else parity holds two copies)."""
import gc
import weakref

import pytest

torch = pytest.importorskip("torch")

from safeclip.export.onnx import onnx_from_module


def test_weights_are_freed_once_the_module_is_dropped(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8)).eval()
    ref = weakref.ref(module[0].weight)
    x = torch.randn(2, 64)
    files = onnx_from_module(module, (x,), tmp_path / "m.onnx", ["x"], ["y"],
                             dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=8)}})
    assert files[0].exists()
    del module
    gc.collect()
    assert ref() is None, "the exported module's parameters are still referenced after the export"
