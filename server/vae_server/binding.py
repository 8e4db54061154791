"""Session runs on bound, preallocated buffers (ONNX Runtime's IO binding), for the GPU.

`BoundRunner` pads each batch to the next of a few fixed batch sizes (`bucket_sizes`) and runs
it on input and output buffers allocated once per size on the device, so a run allocates
nothing. With CUDA graphs on (the CUDA provider's `enable_cuda_graph`), each size is captured
as a graph on its first run (`gpu_graph_id` = its index + 1) and replayed after that: a graph
replays the same device addresses it was captured with, which is why the buffers are fixed.

On the CPU provider the same code runs with `device="cpu"` (the tests use it), but it gains
nothing there: session.run allocates its output as cheaply, and a CPU output buffer is shared
with numpy, so every run's output is copied out. `ModelRuntime` binds on CUDA only, unless
asked (`vae-server --io-binding on`).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vae_core.ort import ort


def bucket_sizes(most: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to `most`, and `most` itself: powers of two and
    the halves between them, so a batch is padded by less than half of its rows."""
    if most < 1:
        raise ValueError("most must be >= 1")
    sizes = {most}
    p = 1
    while p < most:
        sizes.add(p)
        if p >= 2 and p + p // 2 < most:
            sizes.add(p + p // 2)
        p *= 2
    return sorted(sizes)


class _Bucket:
    """The buffers, binding and run options of one batch size."""

    def __init__(self, session: ort.InferenceSession, input_name: str, width: int,
                 outputs: Sequence[tuple[str, int]], rows: int, device: str,
                 graph_id: int | None) -> None:
        self.rows = rows
        # The rows are padded here, on the host, then copied to the device in one piece
        # (OrtValue.update_inplace wants the buffer's whole size). Padding rows keep whatever
        # an earlier, larger batch left: rows are independent, and their outputs are dropped.
        self.staging = np.zeros((rows, width), dtype=np.float32)
        # Memory of its own (on the CPU, from numpy it would share the staging array's).
        self.input = ort.OrtValue.ortvalue_from_shape_and_type([rows, width], np.float32,
                                                               device, 0)
        self.outputs = [ort.OrtValue.ortvalue_from_shape_and_type([rows, w], np.float32,
                                                                  device, 0)
                        for _, w in outputs]
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(input_name, self.input)
        for (name, _), value in zip(outputs, self.outputs, strict=True):
            self.binding.bind_ortvalue_output(name, value)
        # None unless a graph is named: onnxruntime looks the graph id up in the options it is
        # given, and options without one cost a raised and caught error (45 us a run).
        self.options: ort.RunOptions | None = None
        if graph_id is not None:
            self.options = ort.RunOptions()
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))


class BoundRunner:
    """Runs `session` ([N, width] float32 in, [N, w] float32 outs) on bound buffers of a few
    fixed batch sizes, up to `most_rows`; a larger batch runs in pieces of the largest.

    Calls are serialized (the buffers are shared): give each thread that must not wait on
    another its own runner. With `own_thread` (the default with CUDA graphs) every run, the
    first ones included, is made in one thread of the runner's own, and its sizes are run once
    when it is made: the CUDA provider keeps its graphs per thread, captures in CUDA's global
    mode (no other thread may make CUDA calls meanwhile), and a session with graphs may not
    run in two threads at once. So all graphs are captured before the server serves.
    """

    def __init__(self, session: ort.InferenceSession, output_names: Sequence[str],
                 most_rows: int, device: str = "cuda", cuda_graphs: bool = False,
                 own_thread: bool | None = None) -> None:
        (inp,) = session.get_inputs()
        widths = {o.name: o.shape[1] for o in session.get_outputs()}
        if not isinstance(inp.shape[1], int) or not all(
                isinstance(widths[n], int) for n in output_names):
            raise ValueError("IO binding needs a fixed width for each input and output")
        self.session = session
        self.device = device
        self.width = int(inp.shape[1])
        self.sizes = bucket_sizes(most_rows)
        outputs = [(n, int(widths[n])) for n in output_names]
        self._buckets = [
            _Bucket(session, inp.name, self.width, outputs, rows, device,
                    i + 1 if cuda_graphs else None)
            for i, rows in enumerate(self.sizes)]
        self._lock = threading.Lock()
        self._thread: ThreadPoolExecutor | None = None
        if cuda_graphs if own_thread is None else own_thread:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="vae-bound")
            self.warm_up()

    def bucket_for(self, n: int) -> int:
        """The batch size that `n` rows (at most the largest size) are padded to."""
        return self._bucket(n).rows

    def _bucket(self, n: int) -> _Bucket:
        return self._buckets[bisect.bisect_left(self.sizes, n)]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        n = len(x)
        if n == 0 or x.ndim != 2 or x.shape[1] != self.width or x.dtype != np.float32:
            raise ValueError(f"expected [N >= 1, {self.width}] float32 rows, got "
                             f"{list(x.shape)} {x.dtype}")
        if self._thread is not None:
            return self._thread.submit(self._rows, x).result()
        return self._rows(x)

    def _rows(self, x: np.ndarray) -> list[np.ndarray]:
        n = len(x)
        most = self.sizes[-1]
        if n <= most:
            return self._run(x)
        pieces = [self._run(x[i : i + most]) for i in range(0, n, most)]
        return [np.concatenate(parts) for parts in zip(*pieces, strict=True)]

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        n = len(x)
        b = self._bucket(n)
        with self._lock:
            b.staging[:n] = x
            b.input.update_inplace(b.staging)
            self.session.run_with_iobinding(b.binding, b.options)
            # A device buffer comes back as a new host array, of which the first n rows are
            # the answer; a CPU buffer is shared with numpy, and the next run overwrites it.
            if self.device == "cpu":
                return [v.numpy()[:n].copy() for v in b.outputs]
            return [v.numpy()[:n] for v in b.outputs]

    def warm_up(self) -> None:
        """Run each batch size once: allocates, and with CUDA graphs captures each graph."""
        for rows in self.sizes:
            self(np.zeros((rows, self.width), dtype=np.float32))

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown()
