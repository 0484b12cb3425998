"""Benchmark: secateurs.keras against TFMOT (accuracy) and against Keras' own clipping (speed).

Accuracy, on TFMOT's own ground: the same MLP and the seeds' CNN (``padding="same"`` so it
takes the 8x8 digits) are trained dense, then pruned to 90% with polynomial decay and
fine-tuned identically (Adam 1e-3, batch 32, the same epochs, TFMOT's schedule arguments):
once by ``tensorflow_model_optimization`` 0.8 on ``tf_keras`` (Keras 2) in a separate venv
that this script builds (``$SECATEURS_TFMOT_VENV``, default ``/tmp/secateurs-tfmot-venv``),
once by ``secateurs.keras`` on each Keras 3 backend. Mean +- std of test accuracy over the
seeds; target: within 0.5 points.

The runs are paired: for one seed, every implementation starts from the same initial weights
(Glorot-uniform kernels and zero biases drawn by numpy, Keras' own initialisers) and sees the
batches in the same order (one numpy permutation per epoch, ``fit(shuffle=False)`` an epoch at
a time), so a gap between implementations measures the pruning, not two frameworks' RNGs.

Overhead, per backend: the seed CNN's ``fit`` step with ``wrap(Adam(), GlobalNorm(1.0))``
against the same step with Keras' ``Adam(global_clipnorm=1.0)`` (target <= 1.05x), and with
90% pruning masks attached against the unpruned wrapped step (target <= 1.10x). Each round runs
one epoch (45 steps) of every contender in a rotating order; the ratio is the median over
rounds of the per-round ratios, which cancels drifts in machine load.

    .venv/bin/python bench/keras.py [accuracy|overhead|all] [--seeds 3] [--rounds 9]
                                    [--backends torch,jax,tensorflow] [--jobs 2]

Each measurement runs in its own process (a Keras backend is fixed per process); results go
to ``bench/out/keras.json`` and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# this file is keras.py: take its folder off the path, or `import keras` would import it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
OUT = HERE / "out"
VENV = Path(os.environ.get("SECATEURS_TFMOT_VENV", "/tmp/secateurs-tfmot-venv"))
TFMOT_SPEC = ["tensorflow-cpu==2.21.0", "tf_keras~=2.21.0", "tensorflow-model-optimization==0.8.0", "scikit-learn"]
PRE_EPOCHS, PRUNE_EPOCHS, BATCH, SPARSITY = 10, 10, 32, 0.9


# -- the experiment, shared by both implementations (runs in the worker processes) ----------


def digits():
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    order = np.random.default_rng(0).permutation(len(x))  # one split for every run
    x, y = x[order], d.target[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def build(keras, name):
    L = keras.layers
    if name == "mlp":
        layers = [L.Flatten(), L.Dense(128, activation="relu"), L.Dense(64, activation="relu"), L.Dense(10)]
    else:  # the seeds' CIFAR-10 CNN, with padding="same" for 8x8 inputs
        layers = [
            L.Conv2D(32, 3, padding="same", activation="relu"), L.MaxPooling2D(2),
            L.Conv2D(64, 3, padding="same", activation="relu"), L.MaxPooling2D(2),
            L.Conv2D(64, 3, padding="same", activation="relu"), L.Flatten(),
            L.Dense(64, activation="relu"), L.Dense(10),
        ]  # fmt: skip
    return keras.Sequential([keras.Input((8, 8, 1)), *layers])


def schedule_args(n_train):
    steps = math.ceil(n_train / BATCH)
    # prune over the first 80% of the fine-tuning, every half epoch, as TFMOT's examples do
    return {"initial_sparsity": 0.0, "final_sparsity": SPARSITY, "begin_step": 0,
            "end_step": steps * int(PRUNE_EPOCHS * 0.8), "frequency": max(1, steps // 2)}  # fmt: skip


def initial_weights(model, seed):
    """Glorot-uniform kernels and zero biases, as Keras' defaults, drawn by numpy from ``seed``
    (the same numbers for every implementation)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for w in model.get_weights():
        if w.ndim < 2:
            out.append(np.zeros_like(w))
            continue
        receptive = int(np.prod(w.shape[:-2]))
        fan_in, fan_out = w.shape[-2] * receptive, w.shape[-1] * receptive
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        out.append(rng.uniform(-limit, limit, w.shape).astype(w.dtype))
    return out


def fit_epochs(model, x, y, epochs, seed, phase, callbacks=()):
    """``epochs`` epochs, each over one numpy permutation of the data (the same for everyone)."""
    import numpy as np

    for epoch in range(epochs):
        order = np.random.default_rng([seed, phase, epoch]).permutation(len(x))
        model.fit(x[order], y[order], batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks))


def kernel_sparsity(weights):

    kernels = [w for w in weights if w.ndim >= 2]
    return float(sum((w == 0).sum() for w in kernels) / sum(w.size for w in kernels))


def accuracy_run(impl, name, seed):
    if impl == "tfmot":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import tensorflow_model_optimization as tfmot
        import tf_keras as keras
    else:
        import keras

        import secateurs.keras as sk
    (x, y), (xt, yt) = digits()
    keras.utils.set_random_seed(seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = build(keras, name)
    model.set_weights(initial_weights(model, seed))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    fit_epochs(model, x, y, PRE_EPOCHS, seed, 0)
    dense = model.evaluate(xt, yt, verbose=0)[1]
    args = schedule_args(len(x))
    if impl == "tfmot":
        sched = tfmot.sparsity.keras.PolynomialDecay(**args)
        model = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=sched)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
        fit_epochs(model, x, y, PRUNE_EPOCHS, seed, 1, [tfmot.sparsity.keras.UpdatePruningStep()])
        model = tfmot.sparsity.keras.strip_pruning(model)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    else:
        model.compile(optimizer=sk.wrap(keras.optimizers.Adam(1e-3)), loss=loss, metrics=["accuracy"])
        fit_epochs(model, x, y, PRUNE_EPOCHS, seed, 1, [sk.PolynomialDecay(**args)])
        sk.strip(model)
    pruned = model.evaluate(xt, yt, verbose=0)[1]
    weights = [w for w in model.get_weights()]
    return {"dense": float(dense), "pruned": float(pruned), "sparsity": kernel_sparsity(weights)}


def overhead_run(name, rounds):
    import keras
    import numpy as np

    import secateurs.keras as sk

    (x, y), _ = digits()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def compiled(optimizer, prune=False):
        keras.utils.set_random_seed(0)
        model = build(keras, name)
        model.compile(optimizer=optimizer, loss=loss)
        if prune:
            sk.prune_now(model, SPARSITY)
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # compile and warm up
        return model

    contenders = {
        "keras_global_clipnorm": compiled(keras.optimizers.Adam(1e-3, global_clipnorm=1.0)),
        "wrap_global_norm": compiled(sk.wrap(keras.optimizers.Adam(1e-3), sk.GlobalNorm(1.0))),
        "wrap_global_norm_masks": compiled(sk.wrap(keras.optimizers.Adam(1e-3), sk.GlobalNorm(1.0)), prune=True),
    }
    names = list(contenders)
    steps = math.ceil(len(x) / BATCH)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            contenders[n].fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
            times[n].append((time.perf_counter() - start) / steps)
    t = {n: np.asarray(v) for n, v in times.items()}
    return {
        "step_ms": {n: 1e3 * float(np.median(v)) for n, v in t.items()},
        "clip_ratio": float(np.median(t["wrap_global_norm"] / t["keras_global_clipnorm"])),
        "mask_ratio": float(np.median(t["wrap_global_norm_masks"] / t["wrap_global_norm"])),
    }


# -- the driver ------------------------------------------------------------------------------


def ensure_tfmot_venv() -> Path:
    python = VENV / "bin" / "python"
    probe = "import os; os.environ['TF_USE_LEGACY_KERAS']='1'; import tensorflow_model_optimization, tf_keras, sklearn"
    if python.exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return python
    print(f"building {VENV} ({' '.join(TFMOT_SPEC)}) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # TFMOT 0.8 needs numpy 1.x, so this venv cannot share the project's pins
    subprocess.run([python, "-m", "pip", "install", "-q", *TFMOT_SPEC], check=True)
    return python


# one intra-op thread everywhere: on a shared machine a parallel kernel waiting for its second
# thread costs more than the arithmetic of these small models (see bench/clip.py)
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}


def _one_thread() -> None:
    """Pin the worker's backend to one thread (torch reads no environment variable for it)."""
    if os.environ.get("KERAS_BACKEND") == "torch":
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


def worker(python, env_extra, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", **ONE_THREAD, **env_extra}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([str(python), __file__, "worker", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def accuracy(backends, seeds, models=("mlp", "cnn"), jobs=1):
    """Every implementation on seeds ``0 .. seeds-1`` (``jobs`` worker processes at once).

    Beside each implementation's mean +- std, the paired gap to TFMOT: the mean over seeds of
    (its accuracy - TFMOT's on the same seed) with its standard error, and on how many seeds it
    is above, equal or below. On JAX and torch the per-seed gap spreads by about a point (float
    differences between backends grow once pruning starts), so a fraction of a point needs
    tens of seeds to settle."""
    from concurrent.futures import ThreadPoolExecutor

    tfmot_python = ensure_tfmot_venv()
    impls = {"tfmot (tf_keras)": (tfmot_python, {}, "tfmot")}
    impls.update({f"secateurs ({b})": (sys.executable, {"KERAS_BACKEND": b}, "secateurs") for b in backends})
    rows = {}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for name in models:
            futures = {impl: [pool.submit(worker, py, env, "accuracy", kind, name, str(s)) for s in range(seeds)]
                       for impl, (py, env, kind) in impls.items()}
            rows[name] = {impl: [f.result() for f in fs] for impl, fs in futures.items()}
    lines = ["| model | implementation | dense acc | pruned acc (90%) | kernel sparsity | vs TFMOT (paired, +- se) "
             "| per-seed gap sd | seeds above / equal / below |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, runs in rows.items():
        ref = [100 * r["pruned"] for r in runs["tfmot (tf_keras)"]]
        for impl, rs in runs.items():
            d, ds = mean_std([100 * r["dense"] for r in rs])
            p, ps = mean_std([100 * r["pruned"] for r in rs])
            s = statistics.mean(r["sparsity"] for r in rs)
            gaps = [100 * r["pruned"] - t for r, t in zip(rs, ref, strict=True)]
            g, gs = mean_std(gaps)
            se = gs / math.sqrt(len(gaps))
            counts = "/".join(str(sum(1 for x in gaps if f(x))) for f in (
                lambda x: x > 1e-6, lambda x: abs(x) <= 1e-6, lambda x: x < -1e-6))
            lines.append(f"| {name} | {impl} | {d:.2f} +- {ds:.2f} | {p:.2f} +- {ps:.2f} | {100 * s:.1f}% | "
                         f"{g:+.2f} +- {se:.2f} | {gs:.2f} | {counts} |")
    return rows, "\n".join(lines)


def overhead(backends, rounds):
    rows = {b: worker(sys.executable, {"KERAS_BACKEND": b}, "overhead", "cnn", str(rounds)) for b in backends}
    lines = ["| backend | global_clipnorm step | wrap(GlobalNorm) step | + 90% masks | wrap / Keras (<= 1.05) | masks / unpruned (<= 1.10) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for b, r in rows.items():
        ms = r["step_ms"]
        lines.append(
            f"| {b} | {ms['keras_global_clipnorm']:.2f} ms | {ms['wrap_global_norm']:.2f} ms | "
            f"{ms['wrap_global_norm_masks']:.2f} ms | {r['clip_ratio']:.3f}x | {r['mask_ratio']:.3f}x |"
        )
    return rows, "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        kind, *args = sys.argv[2:]
        _one_thread()
        if kind == "accuracy":
            result = accuracy_run(args[0], args[1], int(args[2]))
        else:
            result = overhead_run(args[0], int(args[1]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=("accuracy", "overhead", "all"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--backends", default="torch,jax,tensorflow")
    parser.add_argument("--models", default="mlp,cnn", help="accuracy: mlp, cnn or both")
    parser.add_argument("--jobs", type=int, default=1, help="accuracy: worker processes at once (each one thread)")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    OUT.mkdir(exist_ok=True)
    results, load = {}, os.getloadavg()
    if args.what in ("accuracy", "all"):
        results["accuracy"], table = accuracy(backends, args.seeds, [m for m in args.models.split(",") if m], args.jobs)
        print(table, "\n")
    if args.what in ("overhead", "all"):
        results["overhead"], table = overhead(backends, args.rounds)
        print(table, "\n")
    results["load_before"], results["load_after"] = load, os.getloadavg()
    print(f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    (OUT / "keras.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
