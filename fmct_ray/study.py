"""Does pretraining help? DINO and MAE backbones against random init, few-shot, like for like.

The study behind `jobs/study.py` and the demo's `study` stage, on synthetic heads (`fmct_ray.synthetic`):

  data      an unlabelled pretraining corpus store, and a labelled evaluation store whose "train"
            split is the few-shot pool and whose "test" split is held out (`write_store`)
  pretrain  DINO and MAE with the CPU recipes (`configs/pretrain/cpu_{dino,mae}_tiny.yaml`) through
            Ray Data + Ray Train, exactly as `jobs/pretrain_{dino,mae}.py` runs them
  embed     the evaluation store embedded (Ray Data) by the DINO teacher, the MAE encoder, and the
            same preset at random init (several seeds): CLS and mean patch token
  probe     per task, few-shot linear probes (K positives + K negatives from the pool, several draws,
            the same draws for every backbone) and a supervised scratch model on the same draws
  report    few-shot curves with intervals, the paired permutation p-value of each pretrained
            backbone against random init at each K, and the pretraining curves, as PNG + Markdown

The probe is L2-regularised logistic regression on standardised features (L-BFGS, fixed strength:
nothing is tuned on the test split); every backbone gets the same features, draws and probe.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmct_ray import config as config_lib
from fmct_ray.eval.metrics import auroc, few_shot_summary, paired_permutation_test, sign_flip_test

ROOT = Path(__file__).resolve().parents[1]
echo = functools.partial(print, flush=True)  # progress lines reach a redirected log as they happen
TASKS = ("hydrocephalus", "atrophy", "hemorrhage", "hemorrhage_left")


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs (defaults: the demo's sizes, which fit a 2-core machine).

    Args:
        corpus_scans: unlabelled pretraining scans.
        pool_scans: labelled few-shot pool ("train" split of the evaluation store).
        test_scans: labelled held-out scans ("test" split).
        prevalence: probability of each finding in the evaluation store.
        midline_shift: probability of a midline shift, in the corpus and the evaluation store (0:
            none, the demo's data; add "midline_shift" to `tasks` to probe it).
        atrophy: probability of atrophy, in the corpus and the evaluation store.
        objectives: the pretraining objectives to compare with random init.
        dino_recipe, mae_recipe: pretraining recipes (paths relative to the repository).
        overrides: extra `--set` overrides for both recipes (e.g. "train.epochs=2" in tests).
        workers, cpus_per_worker: Ray Train workers.
        random_seeds: random-init seeds of the baseline backbone.
        shots: K values (positives = negatives = K).
        draws: few-shot draws per K (the same draws for every backbone).
        features: what the probes read: "cls", "patch_mean", "both" (the two), "grid" (every
            patch token, flattened: the only one that keeps where in the head a feature is), or
            "grid+mean" (the grid and the mean patch token, each block given equal weight: one
            probe for spatial and global signs).
        l2: L2 strength of the logistic probe (on standardised features, per sample).
        scratch_epochs: epochs of the supervised scratch model (0: no scratch baseline).
        tasks: label columns to probe.
        data: folder of the data stage's `stores/` and `labels.parquet` (empty: the study's own
            folder); studies of different presets or probes can share one.
        data_seed: seed of the corpus (the evaluation store's is data_seed + 1): another value
            draws other heads, for a confirmatory run of a choice made on the default ones.
    """

    corpus_scans: int = 200
    pool_scans: int = 140
    test_scans: int = 100
    prevalence: float = 0.5
    midline_shift: float = 0.0
    atrophy: float = 0.4
    objectives: tuple[str, ...] = ("dino", "mae")
    dino_recipe: str = "configs/pretrain/cpu_dino_tiny.yaml"
    mae_recipe: str = "configs/pretrain/cpu_mae_tiny.yaml"
    overrides: tuple[str, ...] = ()
    workers: int = 2
    cpus_per_worker: float = 0.5
    random_seeds: tuple[int, ...] = (0, 1, 2)
    shots: tuple[int, ...] = (4, 8, 16, 32)
    draws: int = 5
    features: str = "both"
    l2: float = 1.0
    scratch_epochs: int = 10
    tasks: tuple[str, ...] = TASKS
    data: str = ""
    data_seed: int = 1
    view: dict = field(default_factory=lambda: {"crop": 192, "size": 32})


# -- data -------------------------------------------------------------------------------------
def data_dir(cfg: StudyConfig, out: Path) -> Path:
    return Path(cfg.data).resolve() if cfg.data else out


def stage_data(cfg: StudyConfig, out: Path, log=echo) -> None:
    from fmct_ray.synthetic import write_store

    out = data_dir(cfg, out)
    stores = out / "stores"
    findings = {"midline_shift": cfg.midline_shift, "atrophy": cfg.atrophy}
    if not (stores / "corpus" / "manifest.parquet").exists():
        log(f"== study data: {cfg.corpus_scans} unlabelled pretraining scans")
        corpus = str(stores / "corpus")
        write_store(corpus, cfg.corpus_scans, site="corpus", seed=cfg.data_seed, log=log, **findings)
    if not (out / "labels.parquet").exists():
        n = cfg.pool_scans + cfg.test_scans
        log(f"== study data: {n} labelled scans ({cfg.pool_scans} few-shot pool, {cfg.test_scans} test)")
        splits = ("train",) * cfg.pool_scans + ("test",) * cfg.test_scans  # pool first, then test
        rows = write_store(
            str(stores / "eval"),
            n,
            site="eval",
            seed=cfg.data_seed + 1,
            prevalence=cfg.prevalence,
            splits=splits,
            log=log,
            **findings,
        )
        rows.to_parquet(out / "labels.parquet")


# -- pretraining -------------------------------------------------------------------------------
def pretrain_run(cfg: StudyConfig, out: Path, objective: str) -> Path:
    """Pretrain with the recipe through Ray Train; returns the exported backbone."""
    from fmct_ray.sites import SiteSpec
    from fmct_ray.train.pretrain import PretrainConfig
    from fmct_ray.train.trainer import LaunchConfig, pretrain

    recipe = cfg.dino_recipe if objective == "dino" else cfg.mae_recipe
    pcfg = config_lib.load(PretrainConfig, ROOT / recipe, list(cfg.overrides))
    sites = (SiteSpec(name="corpus", uri=str(data_dir(cfg, out) / "stores" / "corpus")),)
    pcfg = dataclasses.replace(pcfg, data=dataclasses.replace(pcfg.data, sites=sites))
    launch = LaunchConfig(
        name=f"study-{objective}",
        storage_path=str(out / "runs"),
        num_workers=cfg.workers,
        cpus_per_worker=cfg.cpus_per_worker,
    )
    result = pretrain(pcfg, launch)
    if result.error:
        raise RuntimeError(f"{objective} pretraining failed: {result.error}")
    return Path(result.checkpoint.path) / "teacher_backbone.pt"


def backbone_path(out: Path, objective: str) -> Path:
    found = sorted((out / "runs" / f"study-{objective}").glob("checkpoint_*/teacher_backbone.pt"))
    if not found:
        raise FileNotFoundError(f"no {objective} backbone under {out / 'runs'}: run the pretrain stage")
    return found[-1]


# -- embeddings --------------------------------------------------------------------------------
def backbones(cfg: StudyConfig, out: Path) -> dict[str, dict]:
    """Backbone name -> BackboneConfig fields: the pretrained ones and random init of the same preset."""
    from fmct_ray.models import load_backbone

    found = {obj: backbone_path(out, obj) for obj in cfg.objectives}
    archs = {obj: load_backbone(p).config for obj, p in found.items()}
    if len(set(archs.values())) != 1:
        raise ValueError(f"the recipes train different backbones {archs}: a study compares one preset")
    arch = dataclasses.asdict(next(iter(archs.values())))
    random = {f"random{s}": {"preset": "vit3d_tiny", "overrides": arch, "seed": s} for s in cfg.random_seeds}
    return {**{obj: {"path": str(p)} for obj, p in found.items()}, **random}


def stage_embed(cfg: StudyConfig, out: Path, log=echo) -> None:
    from fmct_ray.data.embed import BackboneConfig, EmbedConfig, extract_embeddings
    from fmct_ray.data.views import ViewConfig
    from fmct_ray.sites import SiteSpec

    sites = [SiteSpec("eval", str(data_dir(cfg, out) / "stores" / "eval"))]
    for name, fields in backbones(cfg, out).items():
        ecfg = EmbedConfig(
            backbone=BackboneConfig(**fields),
            view=ViewConfig(**cfg.view),
            tokens=cfg.features.startswith("grid"),
            actors=2,
            cpus_per_actor=0.5,
        )
        n = extract_embeddings(
            ecfg, sites, str(out / "embeddings" / f"{name}.parquet"), splits=("train", "test")
        )
        log(f"== embeddings {name}: {n} scans")


# -- probes ------------------------------------------------------------------------------------
def logistic_probe(
    x: np.ndarray, y: np.ndarray, l2: float = 1.0, weights: np.ndarray | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """L2 logistic regression on standardised features (L-BFGS), each column then multiplied by
    `weights` (None: 1); returns a scoring function."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    if weights is not None:
        sd = sd / weights
    xt = torch.as_tensor((x - mu) / sd, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(xt.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        logits = xt @ w[:-1] + w[-1]
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt)
        value = value + 0.5 * l2 * (w[:-1] ** 2).sum() / len(yt)
        value.backward()
        return value

    opt.step(loss)
    weights = w.detach().numpy()
    return lambda z: ((z - mu) / sd) @ weights[:-1] + weights[-1]


def shots_for(y: np.ndarray, shots, task: str, log=echo) -> list[int]:
    """The K values the pool labels `y` allow (K positives and K negatives), saying which it skips."""
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    skipped = [k for k in shots if k > min(pos, neg)]
    if skipped:
        log(f"== {task}: K={skipped} skipped: the pool has {pos} positives, {neg} negatives")
    return [k for k in shots if k <= min(pos, neg)]


def fewshot_draws(y: np.ndarray, k: int, draws: int, seed: int = 0) -> list[np.ndarray]:
    """`draws` index sets of k positives + k negatives of the pool labels `y` (NaN: unlabelled)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if min(len(pos), len(neg)) < k:
        raise ValueError(f"K={k} needs {k} positives and negatives; the pool has {len(pos)} and {len(neg)}")
    out = []
    for d in range(draws):
        rng = np.random.default_rng([seed, k, d])
        out.append(np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)]))
    return out


def feature_blocks(frame: pd.DataFrame, which: str) -> list[np.ndarray]:
    from fmct_ray.data.embed import matrix

    names = {"both": ["cls", "patch_mean"], "grid+mean": ["grid", "patch_mean"]}.get(which, [which])
    blocks = []
    for name in names:
        if name == "grid":  # the stored tokens are CLS first, then the patch tokens
            tokens = matrix(frame, "tokens", dim=len(frame["cls"].iloc[0]))
            blocks.append(tokens[:, 1:].reshape(len(frame), -1))
        else:
            blocks.append(matrix(frame, name))
    return blocks


def features(frame: pd.DataFrame, which: str) -> tuple[np.ndarray, np.ndarray]:
    """The probe's feature matrix and a weight per column: blocks of d columns out of D in all
    weigh sqrt(D / (n_blocks d)) each, so that after standardisation every block contributes the
    same squared norm (a 96-wide mean token beside a 49,152-wide grid is not drowned); 1 for one
    block or blocks of equal width."""
    blocks = feature_blocks(frame, which)
    total = sum(b.shape[1] for b in blocks)
    weights = [np.full(b.shape[1], np.sqrt(total / (len(blocks) * b.shape[1]))) for b in blocks]
    return np.concatenate(blocks, axis=1), np.concatenate(weights)


def result_row(task: str, backbone: str, k: int, draw: int, test: pd.DataFrame, y, score) -> dict:
    return {
        "task": task,
        "backbone": backbone,
        "shots": k,
        "draw": draw,
        "auroc": auroc(y, score),
        "scan_id": list(test["scan_id"]),
        "score": list(score),
    }


def stage_probe(cfg: StudyConfig, out: Path, log=echo) -> pd.DataFrame:
    """One row per (task, backbone, K, draw): test AUROC and the test scores (for paired tests)."""
    from fmct_ray.data.embed import load_embeddings

    labels = pd.read_parquet(data_dir(cfg, out) / "labels.parquet").set_index("scan_id")
    rows = []
    for name in backbones(cfg, out):
        emb = load_embeddings(str(out / "embeddings" / f"{name}.parquet")).sort_values("scan_id")
        emb = emb.join(labels[list(cfg.tasks)], on="scan_id")
        pool, test = emb[emb["split"] == "train"], emb[emb["split"] == "test"]
        (xp, weights), (xt, _) = features(pool, cfg.features), features(test, cfg.features)
        for task in cfg.tasks:
            yp, yt = pool[task].to_numpy(float), test[task].to_numpy(float)
            for k in shots_for(yp, cfg.shots, task, log):
                for d, idx in enumerate(fewshot_draws(yp, k, cfg.draws)):
                    score = logistic_probe(xp[idx], yp[idx], cfg.l2, weights)(xt)
                    rows.append(result_row(task, name, k, d, test, yt, score))
        log(f"== probes {name}: done")
    if cfg.scratch_epochs:
        rows += scratch_rows(cfg, out, labels, log)
    table = pd.DataFrame(rows)
    table.to_parquet(out / "probes.parquet")
    return table


def scratch_rows(cfg: StudyConfig, out: Path, labels: pd.DataFrame, log=echo) -> list[dict]:
    """The supervised baseline: the same preset trained from random init on each few-shot draw."""
    from fmct_ray.data.embed import BackboneConfig, build_backbone
    from fmct_ray.data.views import ViewConfig, ViewLoader, to_model_input

    view = ViewConfig(**cfg.view)
    store = str(data_dir(cfg, out) / "stores" / "eval")
    manifest = labels.reset_index().sort_values("scan_id")  # the probes' order: the same draws
    pool, test = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "test"]
    loader = ViewLoader({"eval": store}, view, cache=True)
    xp = to_model_input(loader(["eval"] * len(pool), list(pool["scan_id"])), view)
    xt = to_model_input(loader(["eval"] * len(test), list(test["scan_id"])), view)
    first = backbone_path(out, cfg.objectives[0])
    arch = dataclasses.asdict(build_backbone(BackboneConfig(path=str(first))).config)
    rows = []
    for task in cfg.tasks:
        yp, yt = pool[task].to_numpy(float), test[task].to_numpy(float)
        for k in shots_for(yp, cfg.shots, task, lambda _: None):
            for d, idx in enumerate(fewshot_draws(yp, k, cfg.draws)):
                torch.manual_seed(d)
                model = build_backbone(BackboneConfig(preset="vit3d_tiny", overrides=arch, seed=d))
                score = train_scratch(model, xp[idx], yp[idx], xt, cfg.scratch_epochs, seed=d)
                rows.append(result_row(task, "scratch", k, d, test, yt, score))
        log(f"== scratch {task}: done")
    return rows


def train_scratch(model, x: torch.Tensor, y: np.ndarray, x_test: torch.Tensor, epochs: int, seed: int):
    """Full supervised training of backbone + linear head on the few-shot set (AdamW, batch 16)."""
    head = torch.nn.Linear(model.embed_dim, 1)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, foreach=True)
    yt = torch.as_tensor(y, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(16):
            logits = head(model(x[idx]))[:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return torch.cat([head(model(b))[:, 0] for b in x_test.split(32)]).numpy()


# -- report ------------------------------------------------------------------------------------
def family(backbone: str) -> str:
    """ "random2" -> "random": the init seeds of the baseline form one family."""
    return backbone.rstrip("0123456789")


def summarise(table: pd.DataFrame, labels: pd.DataFrame, reference: str = "random") -> pd.DataFrame:
    """Per (task, K, backbone family): mean test AUROC over draws (and init seeds) with a Student-t
    interval, and for every other family against `reference`, on the same test scans and draws:
    `delta_vs_random`, the mean over draws of the two probes' AUROC difference (each member of a
    family paired with each of the other's, draw by draw), with two p-values: `p_vs_random`, the
    paired permutation test on the scans (the draws held fixed), and `p_draws_vs_random`, the sign
    flip test over the draws (would the gain hold for other draws?)."""
    table = table.assign(family=table["backbone"].map(family))
    rows = []
    for (task, k), g in table.groupby(["task", "shots"], sort=True):
        y = labels.loc[list(g["scan_id"].iloc[0]), task].to_numpy(float)
        ref = g[g["family"] == reference]
        for fam, c in g.groupby("family"):
            row = {"task": task, "shots": int(k), "backbone": fam, **few_shot_summary(c["auroc"].to_numpy())}
            if fam != reference and len(pairs := c.merge(ref, on="draw", suffixes=("", "_ref"))):
                a, b = np.stack(list(pairs["score"])), np.stack(list(pairs["score_ref"]))
                row["delta_vs_random"], row["p_vs_random"] = paired_permutation_test(y, a, b)
                per_draw = (pairs["auroc"] - pairs["auroc_ref"]).groupby(pairs["draw"]).mean()
                row["p_draws_vs_random"] = sign_flip_test(per_draw.to_numpy())[1]
            rows.append(row)
    return pd.DataFrame(rows)


def stage_report(cfg: StudyConfig, out: Path, log=echo) -> str:
    """results.md (tables), fewshot_curves.png and pretraining_curves.png under out/report/."""
    from fmct_ray.eval import figures

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    labels = pd.read_parquet(data_dir(cfg, out) / "labels.parquet").set_index("scan_id")
    summary = summarise(pd.read_parquet(out / "probes.parquet"), labels)
    summary.to_csv(report / "fewshot_summary.csv", index=False)
    figures.study_fewshot_curves(summary, report / "fewshot_curves.png")
    runs = {obj: out / "runs" / f"study-{obj}" / "metrics.csv" for obj in ("dino", "mae")}
    figures.pretraining_curves(
        {obj: pd.read_csv(p) for obj, p in runs.items() if p.exists()}, report / "pretraining_curves.png"
    )
    lines = [
        "# Few-shot linear probes: pretrained against random init (same preset, view, probe, draws)",
        "",
        f"Test AUROC, mean over {cfg.draws} draws [95% t interval]; random: {len(cfg.random_seeds)} init "
        "seeds pooled; p: paired permutation test against random init of the mean per-draw AUROC "
        "difference on the held-out scans (draws held fixed); p_draws: sign flip test over the draws.",
        "",
    ]
    for task, g in summary.groupby("task"):
        lines += [f"## {task}", "", "| K | " + " | ".join(sorted(g["backbone"].unique())) + " |"]
        fams = sorted(g["backbone"].unique())
        lines.append("|---" * (len(fams) + 1) + "|")
        for k, c in g.groupby("shots"):
            cells = []
            for fam in fams:
                r = c[c["backbone"] == fam].iloc[0]
                cell = f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
                if "p_vs_random" in r and not pd.isna(r.get("p_vs_random")):
                    cell += f" p={r['p_vs_random']:.3f} p_draws={r['p_draws_vs_random']:.3f}"
                cells.append(cell)
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    (report / "results.md").write_text(text)
    log(text)
    log(f"== study report: {report}")
    return text


STAGES = ("data", "pretrain", "embed", "probe", "report")


def run(cfg: StudyConfig, out: Path, stages=STAGES, log=echo) -> None:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        log(f"\n== study stage {stage}")
        if stage == "data":
            stage_data(cfg, out, log)
        elif stage == "pretrain":
            for obj in cfg.objectives:
                log(f"== pretrain {obj}: {pretrain_run(cfg, out, obj)}")
        elif stage == "embed":
            stage_embed(cfg, out, log)
        elif stage == "probe":
            stage_probe(cfg, out, log)
        elif stage == "report":
            stage_report(cfg, out, log)
        else:
            raise ValueError(f"unknown study stage {stage!r}; known: {STAGES}")
