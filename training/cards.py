"""The model cards: what each trained model is, what trained it and how well it did."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.models.artifacts import training_collections


def margin_images(d: dict[str, Any]) -> str:
    """Which images calibrated the margin, in words."""
    counts = {k: v for k, v in d.get("margin_calibrated_on", {}).items() if v}
    if not counts:
        return "calibration images"
    words = {
        "validation_images": "validation images",
        "training_images": "training images",
        "out_of_fold_training_images": "training images judged out of fold",
        "out_of_fold_whitening_set_images": "whitening-set images judged out of fold",
    }
    return " and ".join(f"{n:,} {words.get(k, k)}" for k, n in counts.items())


def _by_gallery_size(shown: list[tuple[int, float]]) -> str:
    return ", ".join(
        f"**{x:.4f}** for {n:,} enrolled image{'' if n == 1 else 's'}" for n, x in shown
    )


def reid_card(d: dict[str, Any]) -> str:
    m, data, cfg = d["metrics"], d["data"], d["config"]
    collections = training_collections(d)  # the network's and, if whitened, the whitening's
    real = any(c != GENERATED for c in collections)
    network_real = any(c != GENERATED for c in data.get("collections", {}))
    licence = data_section(collections) if collections else ""
    margins = d.get("margins")
    margin = ""
    if d.get("margin") is not None:
        margin = (
            f" Another patient's best score beat an image's own by **{d['margin']:.4f}** or "
            f"more for {cfg['false_match_rate']:.0%} of the {margin_images(d)}"
        )
    if margin and margins:
        sizes, values = margins["gallery_sizes"], margins["margins"]
        shown = [(n, x) for n, x in zip(sizes, values, strict=True) if n in (100, 1_000, 10_000)]
        margin += (
            ", against galleries of their size. The best of more strangers beats more own "
            "scores, so the service flags an image as filed under the wrong patient when another "
            "enrolled patient beats the header patient's own score by the margin for its "
            "gallery's size: "
            + _by_gallery_size(shown)
            + f" (from {margins['own_scores']:,} calibration images compared, as the service "
            "compares them, with the first image of their own patient and of every other "
            f"patient: {margins['stranger_pairs']:,} pairs of strangers; measured up to "
            f"{sizes[-1]:,} images, the last margin beyond; measured by "
            "`benchmarks.verdict_rates`)."
        )
    elif margin:
        margin += (
            ": the margin for that false-alarm rate against a gallery of their size. The service "
            "flags an image as filed under the wrong patient when another enrolled patient beats "
            "the header patient's own score by this margin (measured by "
            "`benchmarks.verdict_rates`)."
        )
    strangers = d.get("stranger_thresholds")
    if strangers:
        sizes, scores = strangers["gallery_sizes"], strangers["scores"]
        shown = [(n, x) for n, x in zip(sizes, scores, strict=True) if n in (1, 100, 1_000)]
        margin += (
            " An image whose header patient is not enrolled has no own score to compare: "
            "another patient must then beat what the best of the gallery's strangers reaches "
            f"for {cfg['false_match_rate']:.0%} of such images, "
            + _by_gallery_size(shown)
            + f" (calibrated on {strangers['stranger_pairs']:,} pairs of strangers; measured "
            f"up to {sizes[-1]:,} images, the last threshold beyond)."
        )
    kind = "real images" if network_real else "generated images"
    who = identities_in(collections)
    if set(collections) - {GENERATED, OWN_IMAGES}:
        reproduce = (
            "`make models REAL=DIR` (DIR: the real images, in the dataset layout), or the "
            "command above"
        )
    elif real:
        reproduce = "the command above, on the same images"
    else:
        reproduce = "`make models` (generated hospital) or the command above"
    return f"""# Re-identification model: {d["modality"]} ({d["version"]})

**What it does.** Embeds a CLAHE-enhanced {d["modality"]} image into a
{cfg["embedding_dim"]}-dimensional unit vector; two images of one {who[:-1]} should have a cosine
similarity above the threshold **{d["threshold"]:.4f}** (calibrated for a false-match rate of
{cfg["false_match_rate"]:.0%} on {d["calibrated_on"]} pairs).{margin}

**Trained on** {kind}, `{data["dataset"]}`: {data["patients"]} {who}, {data["images"]} images;
{data["train_patients"]} {who} ({data["train_images"]} images) for training,
{data["validation_patients"]} other {who} ({data["validation_images"]} images) for
validation. Created {d["created"]} by `{d["command"]}` in {d["training_seconds"]} s.

{licence}
**Network.** {_network_text(d, who)}

**Validation** ({who} unseen in training, each image against all others): P@1
{m["p_at_1"]:.3f}, mAP@R {m["map_at_r"]:.3f}, ROC AUC {m["roc_auc"]:.4f}, EER {m["eer"]:.4f};
at the threshold, true-match rate {m["true_match_rate_at_threshold"]:.3f} and false-match rate
{m["false_match_rate_at_threshold"]:.4f}.

**Reproduce** with {reproduce}.

**Limits.** A model is only as good as the images it was trained on. A hospital must train and
evaluate on its own images (`medreid train reid`, `medreid evaluate reid`) before relying on
it; figures on generated data say nothing about real patients, and figures on public
collections little about another hospital's.
"""


def _network_text(d: dict[str, Any], who: str = "patients") -> str:
    cfg = d["config"]
    network = (
        f"{cfg['backbone']} (alpha {cfg['alpha']}, {cfg['size']} px input, backbone "
        f"initialised from `{cfg['backbone_weights']}`), a linear projection, L2 normalisation"
    )
    if cfg.get("recipe", "finetune") == "frozen":
        chosen: dict[str, float] = next((row for row in d["history"] if row.get("chosen")), {})
        features = (
            f"the maps of {', '.join(f'`{n}`' for n in cfg['feature_layers'])} average-pooled "
            f"on a {cfg['grid']}x{cfg['grid']} grid, square-rooted and L2-normalised each"
            if cfg.get("feature_layers")
            else "its global average pool"
        )
        if cfg.get("flips"):
            features += (
                f", averaged over the image and its {' and '.join(cfg['flips'])} "
                f"flip{'s' if len(cfg['flips']) > 1 else ''}"
            )
        if cfg.get("fit_flips"):
            features += (
                f"; the training images' {' and '.join(cfg['fit_flips'])} flips are fitted "
                f"too, as the same {who}"
            )
        return (
            f"{network}. Recipe `frozen`: the backbone is kept as initialised; the projection "
            f"is a within-class whitening of {features}, fitted on the training {who} "
            f"({cfg['embedding_dim']} dimensions, shrinkage {chosen.get('shrinkage')}, chosen "
            f"by 4-fold cross-validation over {who}: mAP@R {chosen.get('cv_map_at_r', 0):.3f})."
        )
    text = (
        f"{network}. Recipe `finetune`: trained {cfg['epochs']} epochs with a CosFace loss "
        f"(scale {cfg['cosface_scale']}, margin {cfg['cosface_margin']}), augmentation "
        f"{cfg['augmentation']}."
    )
    if cfg.get("whitening_dim"):
        w = d["whitening"]
        text += (
            f" The network is `{w['base_model']}`, trained by `{w['base_command']}` in "
            f"{w['base_training_seconds']} s. Then a within-class whitening of its embeddings "
            f"({cfg['whitening_dim']} dimensions, shrinkage {w['shrinkage']}) fitted on "
            f"{w['patients']} other patients ({w['images']} images of `{w['dataset']}`) that "
            "the network never saw, and L2 normalisation again. The threshold and the "
            "validation figures below come from 4-fold cross-validation over those patients: "
            "each fold's pairs under a whitening fitted without them. The base model measured "
            f"P@1 {w['base_metrics']['p_at_1']:.3f} and ROC AUC "
            f"{w['base_metrics']['roc_auc']:.4f} on its own validation patients."
        )
    return text


GENERATED = ""
OWN_IMAGES = "own"
# The image collections a model may be trained on: where they come from and the licence they
# carry into a model trained on them. A public collection is named by the prefix of its patient
# folders in the dataset layout; any other patient is generated where `medreid synth` wrote the
# dataset, and otherwise one of the hospital's own.
COLLECTIONS = {
    GENERATED: ("generated by `medreid synth`", "no restriction"),
    OWN_IMAGES: (
        "the hospital's own images (no public collection)",
        "the hospital's: the model stays within its data governance",
    ),
    "nih": ("NIH ChestX-ray14 (Wang et al., CVPR 2017)", "free to use; cite Wang et al. 2017"),
    "kermany": ("paediatric chest X-rays (Kermany et al., Cell 2018)", "CC BY 4.0"),
    "nysbu": ("TCIA COVID-19-NY-SBU chest CT (Saltz et al. 2021)", "CC BY 4.0"),
    "btp": ("TCIA Brain-Tumor-Progression MRI (Schmainda & Prah 2018)", "CC BY 3.0"),
    "ham": ("HAM10000 dermoscopy (Tschandl et al., Sci Data 2018)", "CC BY-NC 4.0"),
}
NON_COMMERCIAL = "CC BY-NC 4.0"
# What one identity of a collection is where it is not a patient (HAM10000 has no patient ID).
IDENTITIES = {"ham": "lesions"}


def identities_in(collections: dict[str, int]) -> str:
    """What a model's identities are: "lesions" where every collection's are, else patients."""
    nouns = {IDENTITIES.get(c, "patients") for c in collections}
    return nouns.pop() if len(nouns) == 1 else "patients"


def collection(patient_id: str, *, generated: bool) -> str:
    """The public collection a patient folder names before its first underscore; else
    GENERATED for a patient of a generated dataset, OWN_IMAGES for one of a hospital's."""
    prefix = patient_id.split("_", 1)[0] if "_" in patient_id else ""
    if prefix and prefix in COLLECTIONS and prefix != OWN_IMAGES:
        return prefix
    return GENERATED if generated else OWN_IMAGES


def collections_of(patient_ids: list[str], *, generated: bool) -> dict[str, int]:
    """Images per collection, one patient ID per image."""
    return dict(sorted(Counter(collection(p, generated=generated) for p in patient_ids).items()))


def data_section(collections: dict[str, int]) -> str:
    """What trained a model, collection by collection, with each one's licence; a model
    trained on non-commercial data says so first."""
    named = {c: COLLECTIONS.get(c, (c, "unknown")) for c in collections}
    rows = [f"| {named[c][0]} | {n} | {named[c][1]} |" for c, n in sorted(collections.items())]
    restricted = any(COLLECTIONS.get(c, ("", ""))[1] == NON_COMMERCIAL for c in collections)
    head = (
        "**Licence: non-commercial use only.** Images licensed CC BY-NC 4.0 (HAM10000) "
        "trained it, so the model inherits that licence.\n\n"
        if restricted
        else ""
    )
    table = "| data | images | licence |\n|---|---|---|\n" + "\n".join(rows)
    return f"{head}**Data.**\n\n{table}\n"


def compa_card(d: dict[str, Any]) -> str:
    counts = ", ".join(f"{m}: {n}" for m, n in d["data"]["images"].items())
    data = data_section(d["data"].get("collections", {}))
    return f"""# COMPA modality model ({d["version"]})

**What it does.** Predicts the modality of an enhanced image from its pixels (xray, ct, mri,
dermoscopy, or other) with calibrated scores, by comparing ImageNet MobileNetV2 features and
intensity statistics with {d["config"]["prototypes"]} learned references per modality and
source dataset.

**Trained on** {", ".join(d["data"]["datasets"])} ({counts} images), created {d["created"]}
by `{d["command"]}` in {d["training_seconds"]} s. Validation accuracy (patients held out per
modality): {d["metrics"]["accuracy"]:.4f} on {d["metrics"]["validation_images"]} images.
Temperature {d["temperature"]:.4f}, `other` logit {d["other_logit"]:.4f}.

{data}
**Reproduce** with `make models` (generated hospital, seed 21, plus the real images beside the
checkout when present), or the command above.

**Limits.** It knows only what it was shown: an image unlike every training image should
score `other`, but nothing guarantees it. A hospital must train and evaluate it on its own
images (`medreid train compa`, `medreid evaluate compa`) before relying on it.
"""
