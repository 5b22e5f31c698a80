"""Command line: ``python -m tinyslim {info, pretrain, sample, demo, run, bench, export, import}``.

Each sub-command is a small function, and each `run` scenario has its own options. A user error (a wrong
option or value, a missing or wrong file, Ctrl-C) is one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .pretrained import SHIPPED_BASE, load_base


def base_model(progress: bool = True, log=print, path=None):
    """(the base model, where it came from); see tinyslim.load_base."""
    return load_base(path, progress=progress, log=log, with_source=True)


# ---- sub-commands ------------------------------------------------------------------------------

def cmd_info(args) -> int:
    import cffi

    from . import __version__
    print(f"tinyslim {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} CPUs), "
          f"numpy {np.__version__}, cffi {cffi.__version__}")
    try:
        import torch
        print(f"torch {torch.__version__} (tests and benchmarks only), {torch.get_num_threads()} threads")
    except ImportError:
        print("torch: not installed (needed only for tests and benchmarks)")
    try:
        from . import kernels
        for line in kernels.info_lines():
            print(line)
    except Exception as err:  # a broken kernel package must not hide the rest of the report
        print(f"kernels: unavailable ({type(err).__name__}: {err}); the NumPy autograd still works")
    print(f"base checkpoint shipped: {'yes' if SHIPPED_BASE.is_file() else 'no'} ({SHIPPED_BASE})")
    return 0


def cmd_pretrain(args) -> int:
    from .data import CharTokenizer
    from .io import save_model
    from .nn import GPTConfig
    from .evaluate import knowledge_recall
    from .train import PretrainConfig, pretrain

    model_config = GPTConfig(vocab_size=CharTokenizer().vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                             n_head=args.n_head, block_size=args.block_size)
    config = PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            eval_every=args.eval_every, knowledge_fraction=args.knowledge_fraction)
    state_path = Path(args.out).with_suffix(".state.safetensors")
    model, summary = pretrain(model_config, config, out=state_path, resume=not args.no_resume,
                              progress=not args.quiet)
    save_model(model, args.out, extra={"pretrain": dataclasses.asdict(config),
                                       "val_loss": summary["val_loss"]})
    from .data import PretrainData
    kb = PretrainData(block_size=model_config.block_size, seed=config.seed).kb
    recall = knowledge_recall(model, kb, CharTokenizer(), "heldout")
    print(f"validation loss {summary['val_loss']:.4f} nats/char after {config.steps} steps; "
          f"{summary['wall_s']:.0f} s this run, {summary['tokens_per_s']:.0f} tokens/s; "
          f"held-out-template fact recall {recall:.1%}")
    print(f"model written to {args.out} (resumable state in {state_path})")
    return 0


def _load_for_sampling(path):
    from .io import load_model
    if path:
        return load_model(path)[0], path
    return base_model()


def _attach_adapter(model, path):
    """The fine-tuned method of a `run continual` checkpoint (rebuilt from its name and config, its state
    loaded) or a PEFT LoRA adapter directory, attached to `model`; returns (method or None, a description)."""
    from .adapters import REGISTRY
    from .io import CheckpointError, load_checkpoint

    if Path(path).is_dir():
        from .hf import load_peft_adapter
        load_peft_adapter(model, path)
        return None, f"PEFT adapter {path}"
    arrays, meta = load_checkpoint(path)
    if meta.get("kind") != "continual":
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r}; --adapter takes a `run continual` checkpoint "
                              "(runs/<name>/checkpoints/<method>-seed<N>.safetensors) or a PEFT adapter directory")
    identity = meta["identity"]
    classes = {name: cls for registry in REGISTRY.values() for name, cls in registry.items()}
    if identity["method"] not in classes:
        raise CheckpointError(f"{path} was written by method {identity['method']!r}, which this tinyslim does not know")
    method = classes[identity["method"]](**identity["method_config"])
    method.attach(model, identity["seed"])
    try:
        method.load_state_dict({k[len("method."):]: v for k, v in arrays.items() if k.startswith("method.")},
                               meta["method_state"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not fit this base model: {err}") from None
    done = meta["runner"]["position"][0]
    return method, f"{identity['method']} after {done} of {len(identity['tasks'])} tasks ({path})"


def cmd_sample(args) -> int:
    import contextlib

    from .data import CharTokenizer
    tok = CharTokenizer()
    try:
        idx = tok.encode(args.prompt)[None, :]
    except ValueError as err:
        print(f"error: --prompt: {err}", file=sys.stderr)
        return 2
    model, source = _load_for_sampling(args.checkpoint)
    method = None
    if args.adapter:
        method, adapter = _attach_adapter(model, args.adapter)
        source += f" + {adapter}"
    with method.evaluating() if method is not None else contextlib.nullcontext():
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             greedy=args.greedy, rng=np.random.default_rng(args.seed))
    print(f"# model: {source}")
    print(tok.decode(out[0]))
    return 0


def _base_summary(model, source) -> None:
    from .data import CharTokenizer, PretrainData
    from .evaluate import evaluate_loss, knowledge_recall, next_char_accuracy

    data = PretrainData(block_size=model.config.block_size, seed=0)
    val = data.val_batches(32, 4)
    print(f"base model: {source} ({model.num_parameters():,} parameters): held-out pydoc loss "
          f"{evaluate_loss(model, val):.3f} nats/char, next-char accuracy {next_char_accuracy(model, val):.1%}, "
          f"held-out-template fact recall {knowledge_recall(model, data.kb, CharTokenizer(), 'heldout'):.1%}")


def _git_commit() -> str | None:
    """The commit of the code that runs (with "+changes" when the tree differs from it), or None outside git."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _run_suite(args, default_name: str, command: str) -> int:
    """`demo` and `run all`: every world at one size and seed(s) → runs/<name>/report.{md,json} + plots."""
    from datetime import datetime, timezone

    import json

    from . import kernels
    from .experiments.report import new_run_dir, render_markdown, write_report
    from .io import atomic_write_bytes
    from .experiments.suite import SCENARIOS, run_suite, update_suite_doc

    from .experiments.jobs import default_workers

    seeds = list(range(args.seed, args.seed + args.seeds))
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else list(SCENARIOS)
    if args.workers is None:
        args.workers = default_workers()
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    update = getattr(args, "update", None)
    if update is not None:  # re-run some scenarios of an existing report, in place
        out_dir = Path(update)
        if not (out_dir / "report.json").is_file():
            print(f"error: --update {out_dir}: no report.json there; give the directory of a report written by "
                  "`run all` or `demo`", file=sys.stderr)
            return 2
        if args.name is not None:
            print("error: --update writes into the report's own directory; drop --name", file=sys.stderr)
            return 2
    else:
        try:
            out_dir = new_run_dir(args.runs_dir, args.name, default_name, args.overwrite)
        except FileExistsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    model, source = base_model(progress=not args.quiet, path=args.base)
    _base_summary(model, source)
    print(f"running {', '.join(scenarios)} at size {args.size!r}, seed(s) {', '.join(map(str, seeds))}; "
          f"report in {out_dir}/")
    try:
        doc = run_suite(model, args.size, seeds, scenarios, progress=not args.quiet, methods=methods,
                        workers=args.workers, frontier=args.frontier)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    doc.update(name=out_dir.name, command=command, base_source=source, backend=kernels.get_backend(),
               commit=_git_commit(), created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    out_dir.mkdir(parents=True, exist_ok=True)  # the raw results first: a report that fails to render loses no run
    if update is not None:
        atomic_write_bytes(out_dir / f"suite-update-{'-'.join(scenarios)}.json", json.dumps(doc).encode())
        try:
            doc = update_suite_doc(json.loads((out_dir / "report.json").read_text()), doc)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    atomic_write_bytes(out_dir / "suite.json", json.dumps(doc).encode())
    paths = write_report(doc, out_dir, plots=not args.no_plots)
    print("\n" + render_markdown(doc, terminal=True))
    print(f"\n{len(paths)} files written in {out_dir}/: {', '.join(Path(p).name for p in paths.values())}")
    print(f"{command} finished in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_demo(args) -> int:
    """The main job: every method in the three worlds at a quick size, one seed, with a report."""
    command = "python -m tinyslim demo" + "".join(f" {a}" for a in sys.argv[2:]) if sys.argv[1:2] == ["demo"] \
        else "python -m tinyslim demo"
    return _run_suite(args, f"demo-{args.size}" if args.size != "quick" else "demo", command)


def cmd_tune(args) -> int:
    """`tune`: every tuned method's grid on the tuning seeds → tinyslim/experiments/tuning/<size>.json."""
    from .experiments.jobs import default_workers
    from .experiments.tuning import TUNING_SEEDS, format_tuning, run_tuning, write_tuning

    if args.size == "tiny" and not (args.out or args.dry_run):
        print("error: the tiny size's numbers mean nothing, and it reads the quick size's tuning; pass --out PATH "
              "or --dry-run to try the code path", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(TUNING_SEEDS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    workers = args.workers or default_workers()
    model, _ = base_model(progress=not args.quiet)
    try:
        doc = run_tuning(model, args.size, seeds, methods, workers, progress=not args.quiet)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_tuning(doc))
    if args.dry_run:
        return 0
    print(f"\nwritten: {write_tuning(doc, args.out)} ({doc['wall_s']:.0f} s on {doc['workers']} worker(s))")
    return 0


def cmd_readme(args) -> int:
    """`readme`: rewrite the README's generated result blocks from the reports they name."""
    from .experiments.readme import check_readme, update_readme

    readme = Path(args.readme)
    try:
        changed = check_readme(readme) if args.check else update_readme(readme)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(f"out of date: {', '.join(changed)}" if changed else "every generated block agrees with its report")
        return 1 if changed else 0
    print(f"rewrote: {', '.join(changed)}" if changed else "nothing to rewrite")
    return 0


def cmd_run(args) -> int:
    """`run continual`: every method through the task sequence; prints the table, writes the JSON."""
    import json

    from .experiments.continual import ContinualConfig, format_results, method_overrides, run_methods
    from .io import CheckpointError, atomic_write_bytes

    if args.scenario == "all":
        return cmd_run_all(args)
    suite_only = [flag for flag, value in (("--size", args.size != "quick"), ("--scenarios", args.scenarios),
                                           ("--no-plots", args.no_plots), ("--workers", args.workers),
                                           ("--update", args.update)) if value]
    if suite_only:
        print(f"error: `run {args.scenario}` takes no {', '.join(suite_only)}: such options apply to `run all` and "
              "`demo` only", file=sys.stderr)
        return 2
    if args.scenario != "continual":
        return cmd_run_world(args)
    methods = [m.strip() for m in (args.methods or "lora,er,ilora,cola").split(",") if m.strip()]
    seeds = list(range(args.seed, args.seed + args.seeds))
    name = args.name or (f"continual-seed{args.seed}" if args.seeds == 1 else
                         f"continual-seeds{seeds[0]}-{seeds[-1]}")
    out_dir = Path(args.runs_dir) / name
    if out_dir.exists() and not (args.overwrite or args.resume):
        print(f"error: the run directory {out_dir} exists; choose another --name, pass --resume to go on from its "
              "checkpoints, or --overwrite to start over", file=sys.stderr)
        return 2
    try:
        fields = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                                        n_train=args.n_train, n_test=args.n_test,
                                        eval_batches=args.eval_batches).items() if v is not None}
        if args.rank is not None:
            fields["lora_alpha"] = 2.0 * args.rank  # keep the scale s = α/r = 2
        if args.tasks:
            fields["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if args.no_fact_recall:
            fields["fact_recall"] = False
        config = ContinualConfig(**fields)
        overrides = method_overrides(args.method_args, methods)
        model, source = base_model(progress=not args.quiet, path=args.base)
        doc = run_methods(methods, config, seeds, model, overrides, progress=not args.quiet,
                          checkpoint_dir=out_dir / "checkpoints", resume=args.resume, engine=args.engine)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    doc["base_source"] = source
    doc["cli_args"] = {k: v for k, v in vars(args).items() if k != "fn"}
    table = format_results(doc["summary"], list(config.tasks), doc["base_general"])
    doc["table"] = table
    print(table)
    path = out_dir / "continual.json"
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())
    print(f"\nwritten: {path}")
    return 0


def cmd_run_all(args) -> int:
    """`run all`: the demo's suite with several seeds (mean ± std, claims per seed)."""
    ignored = [flag for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--lr", args.lr),
                                        ("--rank", args.rank), ("--tasks", args.tasks), ("--n-train", args.n_train),
                                        ("--n-test", args.n_test), ("--eval-batches", args.eval_batches),
                                        ("--method-args", args.method_args), ("--set", args.set),
                                        ("--resume", args.resume), ("--no-fact-recall", args.no_fact_recall),
                                        ("--engine", args.engine)) if value]
    if ignored:
        print(f"error: `run all` runs every world at a named --size (quick or full), so options such as "
              f"{', '.join(ignored)} do not apply to `run all`; run one scenario to change its settings",
              file=sys.stderr)
        return 2
    seeds = f"seed{args.seed}" if args.seeds == 1 else f"seeds{args.seed}-{args.seed + args.seeds - 1}"
    command = "python -m tinyslim run all" + "".join(f" {a}" for a in sys.argv[3:]) \
        if sys.argv[1:3] == ["run", "all"] else "python -m tinyslim run all"
    return _run_suite(args, f"all-{args.size}-{seeds}", command)


def cmd_run_world(args) -> int:
    """`run composition` (scenario B) / `run editing` (scenario C): the world for each seed; prints the
    tables, writes runs/<name>/<scenario>.json."""
    import ast
    import json

    from .io import atomic_write_bytes

    scenario = {"compose": "composition", "edit": "editing"}.get(args.scenario, args.scenario)
    if scenario == "composition":
        from .experiments.composition import CompositionConfig as Config
        from .experiments.composition import format_composition as fmt
        from .experiments.composition import run_composition as run
    else:
        from .experiments.editing import EditingConfig as Config
        from .experiments.editing import format_editing as fmt
        from .experiments.editing import run_editing as run
    ignored = [flag for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--lr", args.lr),
                                        ("--rank", args.rank), ("--method-args", args.method_args),
                                        ("--resume", args.resume), ("--engine", args.engine)) if value]
    if scenario == "editing":
        ignored += [flag for flag, value in (("--tasks", args.tasks), ("--n-train", args.n_train),
                                             ("--n-test", args.n_test), ("--eval-batches", args.eval_batches),
                                             ("--no-fact-recall", args.no_fact_recall)) if value]
    if ignored:
        print(f"error: `run {scenario}` takes no {', '.join(ignored)}: such options apply to `run continual` only; "
              f"set {scenario}'s fields with --set FIELD=VALUE", file=sys.stderr)
        return 2
    seeds = list(range(args.seed, args.seed + args.seeds))
    name = args.name or (f"{scenario}-seed{args.seed}" if args.seeds == 1 else f"{scenario}-seeds{seeds[0]}-{seeds[-1]}")
    out_dir = Path(args.runs_dir) / name
    path = out_dir / f"{scenario}.json"
    if path.exists() and not args.overwrite:
        print(f"error: {path} exists; choose another --name or pass --overwrite", file=sys.stderr)
        return 2
    fields = {}
    for spec in args.set:  # FIELD=VALUE of the scenario's config (Python literals, else strings)
        key, sep, raw = spec.partition("=")
        if not sep:
            print(f"error: --set {spec!r} is not FIELD=VALUE", file=sys.stderr)
            return 2
        try:
            fields[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            fields[key.strip()] = raw
    if args.methods:
        fields["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if scenario == "composition":
        fields.update({k: v for k, v in dict(n_train=args.n_train, n_test=args.n_test,
                                             eval_batches=args.eval_batches).items() if v is not None})
        if args.tasks:
            fields["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if args.no_fact_recall:
            fields["fact_recall"] = False
    try:
        config = Config(**fields)
    except (TypeError, ValueError) as err:
        print(f"error: {err} (the {Config.__name__} fields are "
              f"{', '.join(f.name for f in dataclasses.fields(Config))})", file=sys.stderr)
        return 2
    model, source = base_model(progress=not args.quiet, path=args.base)
    runs, tables = [], []
    for seed in seeds:
        doc = run(config, model, seed, progress=not args.quiet)
        tables.append(fmt(doc))
        print(tables[-1] + "\n")
        runs.append(doc)
    out = runs[0] if len(runs) == 1 else {"scenario": scenario, "seeds": seeds, "runs": runs}
    out.update(base_source=source, cli_args={k: v for k, v in vars(args).items() if k != "fn"},
               table="\n\n".join(tables))
    atomic_write_bytes(path, json.dumps(out, indent=1).encode())
    print(f"written: {path}")
    return 0


def cmd_export(args) -> int:
    """A tinyslim checkpoint (default: the base model) → a Hugging Face GPT-2 directory."""
    from .hf import save_hf_gpt2
    from .io import CheckpointError
    try:
        model, source = _load_for_sampling(args.checkpoint)
        save_hf_gpt2(model, args.out)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{source} written in GPT-2's layout to {args.out} (GPT2LMHeadModel.from_pretrained reads it)")
    return 0


def cmd_import(args) -> int:
    """A GPT-2-layout directory (+ optionally a PEFT LoRA adapter, merged in) → a tinyslim checkpoint."""
    from .hf import load_hf_gpt2, load_peft_adapter, merged_model
    from .io import CheckpointError, save_model
    try:
        model = load_hf_gpt2(args.directory)
        if args.peft_adapter:
            load_peft_adapter(model, args.peft_adapter)
            model = merged_model(model)
        save_model(model, args.out, extra={"imported_from": str(args.directory),
                                           "peft_adapter": args.peft_adapter})
    except (CheckpointError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = model.config
    print(f"imported a GPT ({c.n_layer} layers, {c.n_embd} channels, vocabulary {c.vocab_size}, "
          f"{model.num_parameters():,} parameters){' with the adapter merged in' if args.peft_adapter else ''}; "
          f"written to {args.out}")
    return 0


def _bench(argv: list[str]) -> int:
    """`bench train-step …` / `bench kernels …`: forwards the remaining options to the benchmark script."""
    import importlib.util

    usage = "usage: python -m tinyslim bench {train-step,kernels} [options]   (--help after the name for options)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in ("train-step", "kernels"):
        print(usage, file=sys.stderr)
        return 2
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{argv[0].replace('-', '_')}.py"
    if not script.is_file():
        print(f"benchmark script {script} not found: benchmarks run from a source checkout", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module.main(argv[1:]) or 0


def _suite_options(p, default_size: str, prefix: str = "", frontier: bool = False, shown: bool = True) -> None:
    from .experiments.suite import SCENARIOS, SIZES

    def hide(text):
        return text if shown else argparse.SUPPRESS

    p.add_argument("--size", choices=sorted(SIZES), default=default_size,
                   help=hide(f"{prefix}quick (the demo; its measured time is in the README), full (each scenario's "
                             "calibrated settings; ≈ 9 min a seed on 2 cores), tiny (seconds, meaningless numbers)"))
    p.add_argument("--scenarios", default=None, help=hide(f"{prefix}comma-separated subset of {','.join(SCENARIOS)}"))
    p.add_argument("--no-plots", action="store_true", help=hide(f"{prefix}skip the PNG plots"))
    p.add_argument("--workers", type=int, default=None, help=hide(f"{prefix}processes for the independent runs "
                   "(default: one per core; 1 runs everything in this process, with per-step progress bars)"))
    p.add_argument("--frontier", action=argparse.BooleanOptionalAction, default=frontier,
                   help=hide(f"{prefix}also run every scenario-A method at ½× and 2× its learning rate (the "
                             "stability–plasticity frontier that the forgetting claims are judged on); default: on "
                             "for `run all`, off for the one-seed demo"))


def _pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain the tiny base GPT (progress bar, resumable)")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="AdamW's peak learning rate, after warm-up and before the cosine decay (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="step s draws its batch from default_rng([seed, s]) (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="validation loss and a checkpoint every N steps (default %(default)s)")
    p.add_argument("--knowledge-fraction", type=float, default=0.3, help="share of each batch drawn from the "
                   "synthetic knowledge corpus, the rest being pydoc text (default %(default)s)")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks (default %(default)s)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (default %(default)s)")
    p.add_argument("--n-embd", type=int, default=128, help="channels (default %(default)s)")
    p.add_argument("--block-size", type=int, default=128, help="context length (default %(default)s)")
    p.add_argument("--out", default="runs/base/model.safetensors",
                   help="where the final model is written, for `run … --base` and `sample --checkpoint` "
                   "(default %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists (default: "
                   "go on from it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_pretrain)


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint (default: the base model), optionally "
                       "with a fine-tuned adapter")
    p.add_argument("--checkpoint", default=None, help="a model checkpoint (default: the shipped base model)")
    p.add_argument("--adapter", default=None, help="a `run continual` checkpoint "
                   "(runs/<name>/checkpoints/<method>-seed<N>.safetensors) or a PEFT LoRA adapter directory, "
                   "attached to the model")
    p.add_argument("--prompt", default="The ", help="the text to continue (default %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="characters to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest characters only "
                   "(default: all)")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest character")
    p.add_argument("--seed", type=int, default=0, help="the sampling RNG's seed (default %(default)s)")
    p.set_defaults(fn=cmd_sample)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: every method in the three worlds at a quick size, one seed; "
                       "writes runs/<name>/report.md, report.json and plots")
    _suite_options(p, default_size="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="how many seeds (seed, seed+1, …)")
    p.add_argument("--methods", default=None, help="scenario A's methods (default: all, with SLIM's ablation rows)")
    p.add_argument("--base", default=None, help="a base model you pretrained (`pretrain --out PATH`); default: "
                   "the shipped one")
    p.add_argument("--name", default=None, help="run directory under --runs-dir (default: demo, demo-2, … "
                   "whichever is free)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--overwrite", action="store_true", help="replace the run directory given by --name")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)


def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="choose scenario A's settings on the tuning seeds (same grid size for every "
                       "method); writes tinyslim/experiments/tuning/<size>.json, which demo and run all read")
    p.add_argument("--size", choices=["quick", "full", "tiny"], default="quick")
    p.add_argument("--seeds", default=None, help="comma-separated tuning seeds (default 100,101,102; never 0-4, the "
                   "reported seeds)")
    p.add_argument("--methods", default=None, help="comma-separated tuned methods (default: all)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--out", default=None, help="where to write the tuning data (default: the package's file)")
    p.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_tune)


# which `run` scenario shows which option; the others still parse (hidden), so that a misplaced one gets the
# runner's own one-line explanation instead of argparse's usage text
_RUN_SHOWS = {
    "continual": {"--tasks", "--steps", "--batch-size", "--lr", "--rank", "--n-train", "--n-test", "--eval-batches",
                  "--no-fact-recall", "--method-args", "--resume", "--engine"},
    "composition": {"--tasks", "--n-train", "--n-test", "--eval-batches", "--no-fact-recall", "--set"},
    "editing": {"--set"},
    "all": {"--size", "--scenarios", "--no-plots", "--workers", "--frontier", "--update"},
}
_RUN_METHODS = {"continual": "lora,er,ilora,cola", "composition": "lora_sum,nla,mole,mole_nobal",
                "editing": "elder,ft_lora,grace", "all": "every scenario-A method, with SLIM's ablation rows"}


def _run_scenario_parser(runs, scenario: str, aliases: list, help: str) -> None:
    from .experiments.continual import ContinualConfig

    shows = _RUN_SHOWS[scenario]
    d = ContinualConfig()

    def add(flag, *, help, **kw):
        runs_it.add_argument(flag, help=help if flag in shows else argparse.SUPPRESS, **kw)

    runs_it = runs.add_parser(scenario, aliases=aliases, help=help, description=help)
    runs_it.add_argument("--methods", default=None, help=f"comma-separated method names (default "
                         f"{_RUN_METHODS[scenario]})")
    runs_it.add_argument("--seed", type=int, default=0, help="the first seed (default %(default)s)")
    runs_it.add_argument("--seeds", type=int, default=1, help="how many seeds (seed, seed+1, …); mean ± std over "
                         "them (default %(default)s)")
    runs_it.add_argument("--base", default=None, help="a base model you pretrained (`pretrain --out PATH`); "
                         "default: the shipped one")
    add("--tasks", default=None, help="comma-separated task tags in training order (default "
        f"{','.join(d.tasks) if scenario == 'continual' else 'rev,cap,sft'}; also bck, dup, add)")
    add("--steps", type=int, default=None, help=f"optimizer steps per task (default {d.steps})")
    add("--batch-size", type=int, default=None, help=f"examples per step (default {d.batch_size})")
    add("--lr", type=float, default=None, help=f"Adam's peak learning rate, decayed to 0 within each task "
        f"(default {d.lr:g})")
    add("--rank", type=int, default=None, help=f"LoRA rank of every method; α = 2·rank, so the scale stays 2 "
        f"(default {d.rank})")
    add("--n-train", type=int, default=None, help=f"training examples per task (default {d.n_train})")
    add("--n-test", type=int, default=None, help=f"test examples per task (default {d.n_test})")
    add("--eval-batches", type=int, default=None, help=f"held-out pydoc batches for general capability "
        f"(default {d.eval_batches})")
    add("--no-fact-recall", action="store_true", help="skip the held-out fact recall measurement")
    add("--method-args", action="append", default=[], metavar="[METHOD.]FIELD=VALUE",
        help="config overrides, e.g. ilora.ema_lambda=0.999 (repeatable, or comma-separated)")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help=f"a field of {'CompositionConfig' if scenario == 'composition' else 'EditingConfig'}, e.g. "
        f"{'mole_steps=600' if scenario == 'composition' else 'stream_lengths=(10,50,100)'} (repeatable)")
    add("--resume", action="store_true", help="go on from the run directory's checkpoints (written every 100 "
        "steps and at task boundaries), ending as an uninterrupted run would")
    add("--engine", choices=("numpy", "torch"), default=None, help="numpy (default): tinyslim's own autograd; "
        "torch: the same methods on PyTorch, the base model as a transformers GPT2LMHeadModel (needs the [torch] "
        "extra; docs/torch.md)")
    add("--update", default=None, metavar="DIR", help="re-run only --scenarios and replace them in the report in DIR "
        "(same --size and seeds); its claims, tables and plots are made again, and the report says what was re-run")
    runs_it.add_argument("--name", default=None, help="run directory name under --runs-dir (default "
                         f"{'all-<size>-seed<N>' if scenario == 'all' else scenario + '-seed<N>'})")
    runs_it.add_argument("--runs-dir", default="runs", help="where run directories go (default %(default)s)")
    runs_it.add_argument("--overwrite", action="store_true", help="replace an existing run directory's results")
    runs_it.add_argument("--quiet", action="store_true", help="no progress bars")
    _suite_options(runs_it, default_size="quick", frontier=True, shown=scenario == "all")
    runs_it.set_defaults(fn=cmd_run)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run a scenario for several methods and seeds: `run continual` (scenario A), "
                       "`run composition` (B), `run editing` (C), `run all` (every world, with a report)")
    runs = p.add_subparsers(dest="scenario", metavar="{continual,composition,editing,all}")
    runs.required = True
    _run_scenario_parser(runs, "continual", [], "scenario A: every method through the task sequence; prints the "
                         "accuracy matrices, writes runs/<name>/continual.json")
    _run_scenario_parser(runs, "composition", ["compose"], "scenario B: single-task LoRAs composed by sum, NLA and "
                         "MoLE; writes runs/<name>/composition.json")
    _run_scenario_parser(runs, "editing", ["edit"], "scenario C: ELDER, FT-LoRA and GRACE through a stream of "
                         "fact edits; writes runs/<name>/editing.json")
    _run_scenario_parser(runs, "all", [], "every world with a report (as the demo), at --size, over --seeds")


class _Parser(argparse.ArgumentParser):
    """argparse, with a wrong option or value reported in one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tinyslim",
                                     description="tinyslim: LoRA-family fine-tuning and forgetting, from first principles.")
    sub = parser.add_subparsers(dest="command", metavar="{info,pretrain,sample,demo,tune,run,readme,bench,export,import}")
    sub.required = True
    sub.add_parser("info", help="versions, compiled backends and why any is missing").set_defaults(fn=cmd_info)
    _pretrain_parser(sub)
    _sample_parser(sub)
    _demo_parser(sub)
    _tune_parser(sub)

    p = sub.add_parser("readme", help="rewrite the README's result tables from the committed reports they name")
    p.add_argument("--readme", default=str(Path(__file__).resolve().parent.parent / "README.md"))
    p.add_argument("--check", action="store_true", help="only say whether every block agrees (exit 1 if not)")
    p.set_defaults(fn=cmd_readme)

    _run_parser(sub)

    p = sub.add_parser("export", help="write a checkpoint in Hugging Face's GPT-2 layout (config.json + safetensors)")
    p.add_argument("--checkpoint", default=None, help="a tinyslim model checkpoint (default: the base model)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("import", help="read a GPT-2-layout directory (and a PEFT LoRA adapter) into a checkpoint")
    p.add_argument("directory", help="config.json + model.safetensors of a GPT-2")
    p.add_argument("--peft-adapter", default=None, help="a PEFT LoRA adapter directory, merged into the weights")
    p.add_argument("--out", required=True, help="the tinyslim checkpoint to write")
    p.set_defaults(fn=cmd_import)

    sub.add_parser("bench", help="benchmarks: `bench train-step` or `bench kernels` (options follow)",
                   add_help=False)
    return parser


_RUN_SCENARIOS = ("continual", "composition", "compose", "editing", "edit", "all")
_RUN_FLAGS = {"-h", "--help", "--no-fact-recall", "--resume", "--overwrite", "--quiet", "--no-plots", "--frontier",
              "--no-frontier"}  # the `run` options that take no value


def _scenario_first(argv: list[str]) -> list[str] | None:
    """`run --seed 1 continual …` → `run continual --seed 1 …` (each scenario parses its own options); None when
    no scenario is named."""
    i = 1
    while i < len(argv):
        if not argv[i].startswith("-"):
            return argv[:1] + [argv[i]] + argv[1:i] + argv[i + 1:]
        i += 1 if ("=" in argv[i] or argv[i] in _RUN_FLAGS) else 2
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. A user error (a missing or wrong file, Ctrl-C) is one line on stderr, not a
    traceback."""
    from .io import CheckpointError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # the benchmark scripts own their options
        return _bench(argv[1:])
    if argv and argv[0] == "run" and not set(argv[1:2]) & {"-h", "--help"}:
        ordered = _scenario_first(argv)
        if ordered is None:
            print("error: `run` needs a scenario: continual, composition, editing or all, then its options "
                  "(`run <scenario> --help` lists them: e.g. --set for composition and editing)", file=sys.stderr)
            return 2
        argv = ordered
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        again = {"pretrain": "; the same command resumes from the last checkpoint",
                 "run": "; with --resume, `run continual` goes on from the last checkpoint"}.get(args.command, "")
        print(f"interrupted{again}", file=sys.stderr)
        return 130
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
