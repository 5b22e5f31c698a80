"""Scenario C: lifelong editing — a stream of fact edits, ELDER against FT-LoRA and a GRACE-like codebook.

The world is the base model's knowledge corpus (``data.KnowledgeBase``, seed 0: 100 entities, 20
cities, 4 paraphrase templates). ``run_editing`` builds one stream of T_max edits for the run's seed:

    counterfactual edits   a seen entity gets another of the corpus's cities  (≈ new_entity_fraction = 0.5)
    new-entity edits       an invented entity (``kb.new_entity_names``) gets one of the corpus's cities
    each edit is given in ONE template (prompt → "City.\\n"); of its three other templates, one is kept
    for calibrating θ and the other two measure generality

and trains each method through the stream, one ``method.edit(x, y, mask)`` per edit (Adam reset per
edit, n_iter steps, batch of one; docs/methods.md §5.5), on a copy of the base model. After the first T
edits, for every T in ``stream_lengths`` (the stream is shared, so T = 10 is a prefix of T = 50):

    reliability   edit prompts, teacher forced: the rate at which every argmax on "City.\\n" is right
                  (= the greedy answer is the edited city); also the token accuracy (docs/methods.md §5.6), which
                  is inflated here: the base already scores ~0.85, since after a city's first letters the
                  rest of its name, the full stop and the newline are predictable
    generality    the same facts in the two other (non-calibration) templates, same measures
    first-k       reliability of the first ``first_k`` edits, after the whole prefix
    locality      unrelated prompts whose prediction is unchanged from the base model: pydoc windows
                  (every argmax on the last ``text_answer_len`` positions unchanged, teacher forced on
                  held-out pydoc text) and untouched facts (untouched seen entities in all 4 templates:
                  the greedy answer unchanged); ``locality`` pools both, per prompt
    leak          untouched-fact prompts whose greedy answer changed from the base's to a city that some
                  edit so far set (and ``leak_last``: to the latest edit's city)
    deferral      ELDER's mean z on edit prompts, generality prompts and unrelated prompts; for GRACE the same
                  slot holds the share of prompts whose query falls within a key's radius (the rest are the base)

ELDER's deferral is a per-sequence switch (z = 0 rows are the base model bit for bit, and q, hence
z, depends only on the prompt), so one forward with deferral off plus the base model's own forward
give the metrics at every threshold: prediction(θ) = on-prediction where min-Hamming < θ, else the
base's. That is the θ sweep (θ ∈ {2, 4, …, 2k·L_a + 2}: the generality-vs-locality curve), and the
calibration of docs/methods.md §5.4: on a held-out set — the calibration paraphrases of the edits (z
should be 1) and unrelated prompts (another set of untouched entities and other pydoc windows; z
should be 0), disjoint from every evaluation set — pick the θ with the best balanced accuracy of z
(ties: the smaller θ). Metrics are reported at the default θ = k·L_a/2 and at the calibrated θ.

Shape legend: B prompts, T time.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from ..autograd import no_grad
from ..data import PAD_ID, TEMPLATES, CharTokenizer, PretrainData, render
from ..io import jsonable
from ..tasks import encode_examples
from ..evaluate import greedy_answers
from ..adapters.elder import ELDER_PAPER, subject_positions

__all__ = ["EditingConfig", "EDITORS", "make_edit_stream", "run_editing", "format_editing"]

EDITORS = ("elder", "elder_paper", "ft_lora", "grace")  # elder_paper: ELDER at the paper's settings (ELDER_PAPER)


@dataclass
class EditingConfig:
    """Settings of scenario C (one seed, T = 10 and 50, ELDER and FT-LoRA: about 20 s on 2 shared cores with
    OPENBLAS_NUM_THREADS=1; T up to 100: about 35 s). The per-edit budget is the spec's (30 Adam steps at 1e-2, reset
    per edit) for every method; ELDER's routing and pool (the subject key, a centred query, frozen routers, E = 32
    rank-1 experts on mlp.c_fc of the last 2 blocks, k = 2; docs/elder_routing.md), the paper's ELDER (row
    ``elder_paper``: ELDER_PAPER), FT-LoRA's parity rank 32 and GRACE's codebook (at ELDER's routing layer, ε = 1)
    are the adapters' defaults. Extra per-method fields: ``elder`` / ``elder_paper`` / ``ft_lora`` / ``grace``."""

    stream_lengths: tuple[int, ...] = (10, 50)
    methods: tuple[str, ...] = EDITORS
    new_entity_fraction: float = 0.5  # the rest are counterfactual edits of seen entities
    n_iter: int = 30  # optimisation steps per edit (every method)
    lr: float = 1e-2  # Adam, reset per edit (every method)
    elder: dict = field(default_factory=dict)  # ElderConfig overrides, e.g. {"guide_coef": 0.5}
    elder_paper: dict = field(default_factory=dict)  # overrides of the elder_paper row (ElderConfig at ELDER_PAPER)
    ft_lora: dict = field(default_factory=dict)  # FTLoraConfig overrides, e.g. {"r": 4, "lora_alpha": 4}
    grace: dict = field(default_factory=dict)  # GraceConfig overrides, e.g. {"epsilon": 2.0}
    first_k: int = 10  # the early edits whose reliability is tracked after the stream
    n_locality_entities: int = 30  # untouched seen entities for locality and leak (all 4 templates)
    n_calib_entities: int = 15  # other untouched entities: the unrelated half of θ's calibration set
    n_text_windows: int = 32  # held-out pydoc windows for locality (and as many for calibration)
    text_prompt_len: int = 48
    text_answer_len: int = 16
    n_query_windows: int = 256  # block_size windows of the base's training text for ELDER's query means μ_t
    thetas: tuple | None = None  # the sweep; None: 2, 4, …, 2k·L_a + 2

    def __post_init__(self):
        self.stream_lengths = tuple(sorted(int(t) for t in self.stream_lengths))
        self.methods = tuple(self.methods)
        if not self.stream_lengths or self.stream_lengths[0] < 1:
            raise ValueError(f"EditingConfig.stream_lengths must be positive ints, got {self.stream_lengths}")
        unknown = sorted(set(self.methods) - set(EDITORS))
        if unknown or not self.methods:
            raise ValueError(f"EditingConfig.methods: unknown {unknown}; choose from {EDITORS}")
        if not 0 <= self.new_entity_fraction <= 1:
            raise ValueError(f"EditingConfig.new_entity_fraction must be in [0, 1], got {self.new_entity_fraction}")
        for name in ("n_iter", "first_k", "n_locality_entities", "n_calib_entities", "n_text_windows",
                     "text_prompt_len", "text_answer_len", "n_query_windows"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"EditingConfig.{name} must be an int >= 1, got {value!r}")

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))


# ---- the world --------------------------------------------------------------------------------------

def make_edit_stream(kb, n_edits: int, seed: int, new_entity_fraction: float = 0.5,
                     n_locality: int = 30, n_calib: int = 15) -> dict:
    """The edits and the untouched entities of one seed: {"edits": [...], "locality_entities",
    "calib_entities"}. Each edit: entity, city, old_city (None for a new entity), kind, template (the
    one it is given in), calib_template, generality_templates (the other two)."""
    rng = np.random.default_rng([seed, 0xED17])
    n_new = int(round(new_entity_fraction * n_edits))
    n_seen = n_edits - n_new
    if n_seen + n_locality + n_calib > len(kb.entities):
        raise ValueError(f"{n_seen} counterfactual edits + {n_locality} locality + {n_calib} calibration entities "
                         f"need {n_seen + n_locality + n_calib} distinct seen entities; the knowledge base has "
                         f"{len(kb.entities)} (raise new_entity_fraction or lower the others)")
    order = [kb.entities[i] for i in rng.permutation(len(kb.entities))]
    seen, locality, calib = order[:n_seen], order[n_seen:n_seen + n_locality], \
        order[n_seen + n_locality:n_seen + n_locality + n_calib]
    new = kb.new_entity_names(n_new, seed)
    kinds = np.array(["counterfactual"] * n_seen + ["new"] * n_new)[rng.permutation(n_edits)]
    pools = {"counterfactual": iter(seen), "new": iter(new)}
    edits = []
    for kind in kinds.tolist():
        entity = next(pools[kind])
        old = kb.city_of[entity] if kind == "counterfactual" else None
        choices = [c for c in kb.cities if c != old]
        city = choices[int(rng.integers(len(choices)))]
        template = int(rng.integers(len(TEMPLATES)))
        others = [int(t) for t in rng.permutation([t for t in range(len(TEMPLATES)) if t != template])]
        edits.append({"entity": entity, "city": city, "old_city": old, "kind": kind, "template": template,
                      "calib_template": others[0], "generality_templates": sorted(others[1:])})
    return {"edits": edits, "locality_entities": locality, "calib_entities": calib}


class PromptSet:
    """Teacher-forced prompts: (prompt, answer) rows → x, y, mask (B, T) and each row's key positions:
    key_pos (the last prompt character) and subject_pos (the subject's last character; key_pos without one)."""

    def __init__(self, rows, seq_len: int | None = None, subjects: list | None = None):
        self.rows = list(rows)
        if not self.rows:
            raise ValueError("a PromptSet needs at least one row")
        seq_len = seq_len or max(len(p) + len(a) for p, a in self.rows)  # encode_examples adds "\n"
        self.x, self.y, self.mask = encode_examples(self.rows, seq_len)
        self.key_pos = np.array([len(p) - 1 for p, _ in self.rows])  # predicts the first answer character
        self.subject_pos = self.key_pos if subjects is None else \
            subject_positions([p for p, _ in self.rows], subjects)
        self.subjects = [None] * len(self.rows) if subjects is None else list(subjects)

    def __len__(self):
        return len(self.rows)


def _text_set(stream: np.ndarray, n: int, prompt_len: int, answer_len: int, start: int, stop: int):
    """n windows of held-out pydoc ids taken evenly from stream[start:stop]: x, y (n, P + A − 1) with the
    mask on the last A positions, and the key position P − 1."""
    L = prompt_len + answer_len
    starts = np.linspace(start, stop - L - 1, n).astype(np.int64)
    idx = starts[:, None] + np.arange(L)
    ids = stream[idx].astype(np.int64)
    x, y = ids[:, :-1], ids[:, 1:]
    mask = np.zeros(x.shape, dtype=np.float32)
    mask[:, prompt_len - 1:] = 1.0
    key = np.full(n, prompt_len - 1)  # no subject: the last prompt character
    return {"x": x, "y": y, "mask": mask, "key_pos": key, "subject_pos": key, "subjects": [None] * n}


def _fact_rows(entities, city_of) -> list:
    return [render(e, city_of[e], t) for e in entities for t in range(len(TEMPLATES))]


def _fact_subjects(entities) -> list:
    return [e for e in entities for _ in range(len(TEMPLATES))]


def uses_subject_key(router) -> bool:
    """Whether an editor routes from the subject's last character (key_pos="subject_last" or "subject_alone")."""
    return getattr(getattr(router, "config", None), "key_pos", None) in ("subject_last", "subject_alone")


def subject_queries(router, subjects: list):
    """key_pos="subject_alone": the router's queries (B, d) of the subjects read alone (NaN rows where a row
    has no subject: those are read in the prompt); None for the other key positions."""
    if getattr(getattr(router, "config", None), "key_pos", None) != "subject_alone":
        return None
    tok = CharTokenizer()
    named = [i for i, subject in enumerate(subjects) if subject is not None]
    if not named:
        return None
    q = router.subject_queries([tok.encode(subjects[i]) for i in named])
    out = np.full((len(subjects), q.shape[1]), np.nan)
    out[named] = q
    return out


# ---- predictions ------------------------------------------------------------------------------------

class Predictor:
    """Argmax predictions (teacher forced) and greedy answers of one model state, optionally through an
    editor that routes from each row's key token (``router``): ELDER, with deferral off, plus each row's
    min-Hamming distance; or GRACE, its codebook as it is, plus whether each row's query hit a key."""

    def __init__(self, model, router=None):
        self.model, self.router = model, router
        self.tok = CharTokenizer()

    @contextlib.contextmanager
    def _always_routed(self):
        """ELDER: z ≡ 1, the routed mixture on every row (the θ sweep picks per row afterwards)."""
        cfg = self.router.config
        previous = getattr(cfg, "deferral", None)
        if previous is not None:
            cfg.deferral = False
        try:
            yield
        finally:
            if previous is not None:
                cfg.deferral = previous

    def forward(self, x, key_pos, subject_pos=None, subjects=None):
        queries = None
        if uses_subject_key(self.router):
            key_pos, queries = subject_pos, subject_queries(self.router, subjects or [None] * len(x))
        if self.router is None:
            was = self.model.training
            self.model.eval()
            with no_grad():
                logits, _ = self.model(x)
            self.model.train(was)
            return logits.data.argmax(-1), None
        with self._always_routed():
            out = self.router.route(x, key_pos, queries)
        return out["logits"].argmax(-1), out["min_hamming"] if "min_hamming" in out else out["hit"]

    def greedy(self, prompts: list, max_new: int, subjects: list | None = None) -> list:
        """Greedy answers, cut at the newline; the router routes from each prompt's last token (or from its
        subject's last character, key_pos="subject_last")."""
        if self.router is None:
            return greedy_answers(self.model, self.tok, prompts, max_new)
        answers = [""] * len(prompts)
        subject_key = uses_subject_key(self.router)
        keys = subject_positions(prompts, subjects) if subject_key else np.array([len(p) - 1 for p in prompts])
        queries = subject_queries(self.router, subjects) if subject_key else None
        by_len: dict = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        with self._always_routed():
            for n, members in sorted(by_len.items()):
                idx = np.stack([self.tok.encode(prompts[i]) for i in members])
                given = None if queries is None else queries[members]
                with self.router.evaluating(), self.router.keys(keys[members], given):
                    out = self.model.generate(idx, max_new, greedy=True)[:, n:]
                for i, row in zip(members, out):
                    answers[i] = self.tok.decode(row).split("\n")[0]
        return answers


def _row_scores(pred, y, mask):
    """(token accuracy, exact) per row over the masked positions."""
    m = np.asarray(mask) > 0
    hit = (pred == y) & m
    return hit.sum(1) / np.maximum(m.sum(1), 1), (hit.sum(1) == m.sum(1)).astype(np.float64)


def _unchanged(pred, base_pred, mask):
    m = np.asarray(mask) > 0
    same = (pred == base_pred) | ~m
    return same.all(1).astype(np.float64), ((pred == base_pred) & m).sum(1) / np.maximum(m.sum(1), 1)


def _city(answer: str) -> str:
    return answer.strip().rstrip(".")


# ---- the runner -------------------------------------------------------------------------------------

def run_editing(config: EditingConfig, base_model, seed: int = 0, progress: bool = True) -> dict:
    """Scenario C for one seed: every method through the edit stream; metrics after each prefix T."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    say = tqdm.write if progress else (lambda *_: None)
    world = EditWorld(config, base_model, seed)
    base_metrics = world.metrics_at(world.base_out, world.T_max)  # the unedited model on the full stream
    for key in ("locality", "locality_text", "locality_text_tokens", "locality_facts", "leak", "leak_last"):
        base_metrics.pop(key, None)  # (a reference row: it cannot change what it never changed)
    results = {name: run_editor(name, world, base_model, seed, progress, say) for name in config.methods}
    return jsonable({"scenario": "editing", "seed": seed, "config": config.to_dict(),
                     "stream": world.world, "base": base_metrics, "results": results,
                     "wall_s": time.perf_counter() - t0})


class EditWorld:
    """One seed's edit stream with its fixed evaluation and calibration sets, the base model's predictions on
    them, and the metrics of any model's predictions (metrics_at)."""

    def __init__(self, config: EditingConfig, base_model, seed: int):
        self.config = config
        data = PretrainData(block_size=base_model.config.block_size, seed=0)  # the base's corpus and KB
        kb = data.kb
        self.T_max = config.stream_lengths[-1]
        self.world = make_edit_stream(kb, self.T_max, seed, config.new_entity_fraction,
                                      config.n_locality_entities, config.n_calib_entities)
        self.edits = edits = self.world["edits"]
        # evaluation and calibration sets (fixed for the run)
        self.edit_rows = [render(e["entity"], e["city"], e["template"]) for e in edits]
        gen_rows, gen_edit = [], []  # generality prompts and the edit each belongs to
        for i, e in enumerate(edits):
            for t in e["generality_templates"]:
                gen_rows.append(render(e["entity"], e["city"], t))
                gen_edit.append(i)
        self.gen_edit = np.array(gen_edit)
        calib_par_rows = [render(e["entity"], e["city"], e["calib_template"]) for e in edits]
        loc_rows = _fact_rows(self.world["locality_entities"], kb.city_of)
        calib_fact_rows = _fact_rows(self.world["calib_entities"], kb.city_of)
        rows = self.edit_rows + gen_rows + calib_par_rows + loc_rows + calib_fact_rows
        seq_len = max(len(p) + len(a) for p, a in rows)
        if seq_len > base_model.config.block_size:
            raise ValueError(f"fact lines need {seq_len} positions but block_size is {base_model.config.block_size}")
        self.edit_subjects = [e["entity"] for e in edits]
        loc_subjects = _fact_subjects(self.world["locality_entities"])
        calib_subjects = _fact_subjects(self.world["calib_entities"])
        self.sets = {"edit": PromptSet(self.edit_rows, seq_len, self.edit_subjects),
                     "gen": PromptSet(gen_rows, seq_len, [edits[i]["entity"] for i in gen_edit]),
                     "calib_par": PromptSet(calib_par_rows, seq_len, self.edit_subjects),
                     "loc_fact": PromptSet(loc_rows, seq_len, loc_subjects),
                     "calib_fact": PromptSet(calib_fact_rows, seq_len, calib_subjects)}
        val = data.streams["val"]
        half = len(val) // 2
        n, lp, la = config.n_text_windows, config.text_prompt_len, config.text_answer_len
        self.texts = {"loc_text": _text_set(val, n, lp, la, 0, half),
                      "calib_text": _text_set(val, n, lp, la, half, len(val))}
        self.max_new = max(len(c) for c in kb.cities) + 2
        self.fact_prompts = {"loc_fact": [p for p, _ in loc_rows], "calib_fact": [p for p, _ in calib_fact_rows]}
        self.fact_subjects = {"loc_fact": loc_subjects, "calib_fact": calib_subjects}
        # unlabelled text for ELDER's query mean (query_norm="centred"): pydoc windows of the base's own training
        # stream, disjoint from every evaluation and calibration set (those are facts and held-out pydoc)
        L = base_model.config.block_size
        self.query_text = data.streams["train"][:config.n_query_windows * L].astype(np.int64).reshape(-1, L)
        self.base_out = self.predict_all(Predictor(base_model))

    def predict_all(self, pred: Predictor) -> dict:
        out = {}
        for name, s in self.sets.items():
            out[name] = pred.forward(s.x, s.key_pos, s.subject_pos, s.subjects)
        for name, s in self.texts.items():
            out[name] = pred.forward(s["x"], s["key_pos"], s["subject_pos"], s["subjects"])
        for name, prompts in self.fact_prompts.items():
            out[name + "_greedy"] = pred.greedy(prompts, self.max_new, self.fact_subjects[name])
        return out

    def metrics_at(self, on: dict, T: int, z_of=None, pick: bool = True) -> dict:
        """Metrics after T edits. z_of(name) → (B,) bool: each row's routing flag, reported as deferral_rate;
        with pick, a row takes the on-prediction where z and the base's elsewhere (ELDER's θ sweep). GRACE's
        on-predictions need no picking: a row without a key in range is the base already."""
        config, edits, base_out, sets, texts, gen_edit = \
            self.config, self.edits, self.base_out, self.sets, self.texts, self.gen_edit

        def choose(name):
            p = on[name][0]
            if z_of is None or not pick:
                return p
            z = z_of(name)
            return np.where(z[:, None], p, base_out[name][0])

        def choose_greedy(name):
            if z_of is None or not pick:
                return on[name + "_greedy"]
            z = z_of(name)
            return [a if zi else b for a, b, zi in zip(on[name + "_greedy"], base_out[name + "_greedy"], z)]

        s = sets["edit"]
        tok, exact = _row_scores(choose("edit"), s.y, s.mask)
        tok, exact = tok[:T], exact[:T]
        g = sets["gen"]
        gsel = gen_edit < T
        gtok, gexact = _row_scores(choose("gen"), g.y, g.mask)
        text = texts["loc_text"]
        t_same, t_tok = _unchanged(choose("loc_text"), base_out["loc_text"][0], text["mask"])
        ans, base_ans = choose_greedy("loc_fact"), base_out["loc_fact_greedy"]
        f_same = np.array([a == b for a, b in zip(ans, base_ans)], dtype=np.float64)
        edited_cities = {e["city"] for e in edits[:T]}
        leak = np.array([a != b and _city(a) in edited_cities for a, b in zip(ans, base_ans)], dtype=np.float64)
        leak_last = np.array([a != b and _city(a) == edits[T - 1]["city"] for a, b in zip(ans, base_ans)],
                             dtype=np.float64)
        k = min(config.first_k, T)
        kinds = np.array([e["kind"] for e in edits[:T]])
        out = {"reliability": float(exact.mean()), "reliability_tokens": float(tok.mean()),
               "generality": float(gexact[gsel].mean()), "generality_tokens": float(gtok[gsel].mean()),
               f"first{config.first_k}_reliability": float(exact[:k].mean()),
               f"first{config.first_k}_reliability_tokens": float(tok[:k].mean()),
               "locality": float(np.concatenate([t_same, f_same]).mean()),
               "locality_text": float(t_same.mean()), "locality_text_tokens": float(t_tok.mean()),
               "locality_facts": float(f_same.mean()), "leak": float(leak.mean()), "leak_last": float(leak_last.mean()),
               "by_kind": {kind: {"reliability": float(exact[kinds == kind].mean()),
                                  "generality": float(gexact[gsel & np.isin(gen_edit, np.flatnonzero(kinds == kind))].mean())}
                           for kind in ("counterfactual", "new") if (kinds == kind).any()}}
        if z_of is not None:
            z_edit = z_of("edit")[:T]
            out["deferral_rate"] = {"edit": float(z_edit.mean()), "generality": float(z_of("gen")[gsel].mean()),
                                    "unrelated": float(np.concatenate([z_of("loc_text"), z_of("loc_fact")]).mean())}
        return out


def make_editor(name: str, config: EditingConfig, T_max: int):
    """The method `name` with the scenario's per-edit budget and its own overrides."""
    from ..adapters import EDIT_METHODS

    per_method = {"elder": config.elder, "elder_paper": {**ELDER_PAPER, **config.elder_paper},
                  "ft_lora": config.ft_lora, "grace": config.grace}[name]
    overrides = {"n_iter": config.n_iter, "lr": config.lr, **per_method}
    if name != "ft_lora":  # ELDER and GRACE route from each prompt's key token and keep a table of edits
        overrides.setdefault("pad_token_id", PAD_ID)
        # GRACE adds at most one key per edit, so its codebook (and trainable count) is sized to the stream
        overrides.setdefault("max_edits", T_max if name == "grace" else max(1024, T_max))
    return EDIT_METHODS["elder" if name == "elder_paper" else name](**overrides)


def run_editor(name: str, world: EditWorld, base_model, seed: int, progress: bool, say) -> dict:
    """One method through the stream on a copy of the base; its metrics after each T in stream_lengths."""
    from tqdm.auto import tqdm

    config, edit_rows = world.config, world.edit_rows
    t_method = time.perf_counter()
    method = make_editor(name, config, world.T_max)
    model = copy.deepcopy(base_model)  # the caller's model is never touched
    model.train()
    method.attach(model, seed)
    if getattr(method.config, "query_norm", "none") == "centred":
        method.fit_query_mean(world.query_text)
    subject_key = uses_subject_key(method)
    checkpoints, losses, edit_s = {}, [], 0.0
    bar = tqdm(range(world.T_max), disable=not progress, leave=False, unit="edit", desc=f"{name} edits")
    for i in bar:
        x, y, mask = encode_examples([edit_rows[i]], len(edit_rows[i][0]) + len(edit_rows[i][1]))
        t_edit = time.perf_counter()
        key, kw = None, {}
        if subject_key:
            key = subject_positions([edit_rows[i][0]], [world.edit_subjects[i]])
            queries = subject_queries(method, [world.edit_subjects[i]])
            kw = {} if queries is None else {"queries": queries}
        curve = method.edit(x, y, mask, key_pos=key, **kw)
        edit_s += time.perf_counter() - t_edit
        losses.append({"first": curve[0], "last": curve[-1]})
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
        T = i + 1
        if T not in config.stream_lengths:
            continue
        on = world.predict_all(Predictor(model, None if name == "ft_lora" else method))
        if name.startswith("elder"):
            checkpoints[T] = elder_checkpoint(method, on, T, world.metrics_at, config)
        elif name == "grace":  # on[...][1]: whether each row's query hit a key
            checkpoints[T] = {**world.metrics_at(on, T, lambda set_name: on[set_name][1], pick=False),
                              "n_keys": method.n_keys}
        else:
            checkpoints[T] = world.metrics_at(on, T)
        m = checkpoints[T]["default"] if name.startswith("elder") else checkpoints[T]
        say(f"{name} after {T} edits: reliability {m['reliability']:.2f}, generality {m['generality']:.2f}, "
            f"locality {m['locality']:.2f}, leak {m['leak']:.2f}")
    bar.close()
    return {"by_T": {str(T): v for T, v in checkpoints.items()}, "describe": method.describe(),
            "trainable_params": int(sum(p.size for p in method.trainable_parameters())),
            "edit_losses": losses, "edit_s": edit_s, "wall_s": time.perf_counter() - t_method}


def elder_checkpoint(elder, on: dict, T: int, metrics_at, config: EditingConfig) -> dict:
    """ELDER after T edits: metrics at the default θ, the θ sweep, and θ calibrated on the held-out set."""
    default = elder.theta
    La, k = len(elder.layers()), elder.config.top_k
    thetas = list(config.thetas) if config.thetas else list(range(2, 2 * k * La + 3, 2))
    mh = {name: value[1] for name, value in on.items() if not name.endswith("_greedy")}
    mh.update({name + "_greedy": mh[name] for name in ("loc_fact", "calib_fact")})

    def z_at(theta):
        return lambda name: mh[name] < theta

    sweep, calib = [], []
    for theta in thetas:
        m = metrics_at(on, T, z_at(theta))
        sweep.append({"theta": theta, **{key: m[key] for key in ("reliability", "generality", "locality",
                                                                 "locality_text", "locality_facts", "leak")},
                      "deferral_rate": m["deferral_rate"]})
        z_par = mh["calib_par"][:T] < theta  # paraphrases of the edits so far: z should be 1
        z_unrel = np.concatenate([mh["calib_text"], mh["calib_fact"]]) < theta  # z should be 0
        calib.append({"theta": theta, "tpr": float(z_par.mean()), "fpr": float(z_unrel.mean()),
                      "balanced_accuracy": float(0.5 * (z_par.mean() + 1 - z_unrel.mean()))})
    best = max(calib, key=lambda c: (c["balanced_accuracy"], -c["theta"]))["theta"]
    return {"default_theta": default, "calibrated_theta": best,
            "default": metrics_at(on, T, z_at(default)), "calibrated": metrics_at(on, T, z_at(best)),
            "no_deferral": metrics_at(on, T), "sweep": sweep, "calibration": calib,
            "n_codes": elder.n_edits}


def format_editing(doc: dict) -> str:
    """The scenario-C tables: metrics per method and stream length; ELDER's θ sweep and calibration."""
    cfg = doc["config"]
    k = cfg["first_k"]
    head = (f"{'method':<22}{'T':>4} {'rel':>5} {'relTk':>5} {'gen':>5} {'genTk':>5} {f'1st{k}':>5} {'loc':>5} "
            f"{'locTx':>5} {'locFa':>5} {'leak':>5} {'z:ed':>5} {'z:gen':>5} {'z:unr':>5}")
    lines = [f"scenario C (lifelong editing), seed {doc['seed']}: {cfg['n_iter']} Adam steps at lr {cfg['lr']:g} per "
             f"edit (reset per edit); {doc['wall_s']:.0f} s",
             "rel/gen = the new city is the answer (every target token's argmax right, = the greedy answer; Tk: token accuracy, "
             "inflated by the predictable letters of a known city name); 1stK = reliability of the first K edits "
             "after the stream; loc = unrelated prompts unchanged from the base (Tx: pydoc windows, Fa: untouched "
             "facts); leak = untouched entities now answering an edited city; z = the share of prompts routed to "
             "the edits (ELDER: deferral z = 1; GRACE: a key within its radius) on edit, paraphrase and unrelated "
             "prompts", head]

    def row(label, T, m):
        z = m.get("deferral_rate")
        zs = f"{z['edit']:5.2f} {z['generality']:5.2f} {z['unrelated']:5.2f}" if z else f"{'-':>5} {'-':>5} {'-':>5}"
        loc = lambda key: f"{m[key]:5.2f}" if key in m else f"{'-':>5}"  # noqa: E731
        return (f"{label:<22}{T:>4} {m['reliability']:5.2f} {m['reliability_tokens']:5.2f} {m['generality']:5.2f} "
                f"{m['generality_tokens']:5.2f} {m[f'first{k}_reliability']:5.2f} {loc('locality')} "
                f"{loc('locality_text')} {loc('locality_facts')} {loc('leak')} {zs}")

    lines.append(row("base (no edit)", max(cfg["stream_lengths"]), doc["base"]))
    for name, r in doc["results"].items():
        for T, c in r["by_T"].items():
            if name.startswith("elder"):
                lines.append(row(f"{name} θ={c['default_theta']:g} (default)", int(T), c["default"]))
                lines.append(row(f"{name} θ={c['calibrated_theta']:g} (calibrated)", int(T), c["calibrated"]))
                lines.append(row(f"{name}, no deferral", int(T), c["no_deferral"]))
            elif name == "grace":
                lines.append(row(f"grace ε={r['describe']['config']['epsilon']:g} ({c['n_keys']} keys)", int(T), c))
            else:
                lines.append(row(name, int(T), c))
    for name, r in doc["results"].items():
        lines.append(f"{name}: {r['trainable_params']:,} trainable parameters, {r['edit_s']:.0f} s editing, "
                     f"{r['wall_s']:.0f} s with evaluation")
    for name in [n for n in doc["results"] if n.startswith("elder")]:
        for T, c in doc["results"][name]["by_T"].items():
            lines.append(f"\n{name} after {T} edits: the deferral threshold's trade-off (evaluation sets) and its "
                         f"calibration (held-out paraphrases vs unrelated prompts)")
            lines.append(f"  {'θ':>3} {'rel':>5} {'gen':>5} {'loc':>5} {'leak':>5} | {'TPR':>5} {'FPR':>5} {'bal':>5}")
            for s, cal in zip(c["sweep"], c["calibration"]):
                mark = " ← calibrated" if s["theta"] == c["calibrated_theta"] else ""
                mark += " (default)" if s["theta"] == c["default_theta"] else ""
                lines.append(f"  {s['theta']:>3g} {s['reliability']:5.2f} {s['generality']:5.2f} {s['locality']:5.2f} "
                             f"{s['leak']:5.2f} | {cal['tpr']:5.2f} {cal['fpr']:5.2f} {cal['balanced_accuracy']:5.2f}{mark}")
    return "\n".join(lines)
