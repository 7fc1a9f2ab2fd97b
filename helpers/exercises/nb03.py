"""Checks of notebook 03 (null-text inversion and prompt-to-prompt): exercises 03.1-03.5.

Null-text inversion is the expensive part of the course (a backward pass through the UNet per inner iteration), so
every exercise here grades on ONE scene (`scene_03`, the notebook's worked example at its default SCENE) and a
SHORT schedule (`STEPS_03` DDIM steps): a reference inversion costs a few seconds on a CPU, and is cached per
pipeline, so the check after a student's cell costs about what the student's cell did, once.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import torch

from ._common import _check_pipe, _close, _number, _pct, _psnr_hint, _store, _verdict

__all__ = ["STEPS_03", "SCENE_03", "GUIDANCE_03", "SWAP_GUIDANCE_03", "GUIDANCES_03_1",
           "SCHEDULES_03_2", "BLEND_SETTINGS_03_3", "scene_03", "swap_03", "refine_positions_03",
           "check_03_1", "check_03_2", "check_03_3", "check_03_4", "check_03_5"]

STEPS_03 = 5              # DDIM steps of every exercise: a short schedule (the notebook's STEPS is 20)
SCENE_03 = 8              # held-out scene 8, "a green square, a blue triangle and a red circle" (= the worked example)
GUIDANCE_03 = 7.5         # guidance of the inversions (the reference's)
SWAP_GUIDANCE_03 = 3.0    # guidance of the word-swap exercises (section 7: the swap works there)
GUIDANCES_03_1 = (1.0, 2.0, 4.0, 7.5)
# exercise 03.2: the reference schedule and two cheaper variants (null_text_inversion(..., **options))
SCHEDULES_03_2 = {
    "reference": {},
    "tol_scale=3000": {"tol_scale": 3000},
    "optimise_steps=3": {"optimise_steps": 3},
}
# exercise 03.3: the reference preset, then one setting overridden at a time (edit(..., preset="reference", **kw))
BLEND_SETTINGS_03_3 = {
    "reference": {},
    "blend_scales=(1/2,)": {"blend_scales": (1 / 2,)},
    "blend_scales=(1,)": {"blend_scales": (1,)},
    "resize='bilinear'": {"resize": "bilinear"},
    "threshold=0.5": {"threshold": 0.5},
}
PSNR_TOL = 0.05           # dB: the same reconstruction decoded another way may differ in a last bit
LATENT_TOL = 1e-3         # the notebook's tolerance between a written-out processor and helpers.p2p.edit


# -- the exercise scene and its references (cached per pipeline) ------------------------------------------------
def scene_03(pipe_or_size):
    """The exercises' scene: held-out scene SCENE_03 at the pipeline's native size (or a given side)."""
    from .. import toyworld as tw
    from ..images import native_size
    size = pipe_or_size if isinstance(pipe_or_size, int) else native_size(pipe_or_size)
    return tw.heldout_scene(SCENE_03, size=size)


def swap_03(sc):
    """The word swap of the exercises on scene `sc`: its circle becomes a square.

    Returns (index of the circle, the swapped scene (the toy world's truth), the region the swap may change)."""
    from .. import toyworld as tw
    idx = [o.shape for o in sc.objects].index("circle")
    gt = tw.with_shape(sc, idx, "square")
    return idx, gt, sc.objects[idx].mask | gt.objects[idx].mask


@contextlib.contextmanager
def _frozen(unet):
    """The UNet's weights without gradients while a reference inversion runs (as the notebook sets them)."""
    flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(unet.parameters(), flags):
            p.requires_grad_(f)


def _ex(pipe) -> SimpleNamespace:
    """The exercise scene, its latents, caption and swap, cached."""
    from ..images import encode
    store = _store(pipe)
    if "03" not in store:
        sc = scene_03(pipe)
        idx, gt, region = swap_03(sc)
        store["03"] = SimpleNamespace(scene=sc, image=sc.image, prompt=sc.caption, z=encode(pipe, sc.image),
                                      idx=idx, swap_prompt=gt.caption, region=region)
    return store["03"]


def _u8(pipe, latents) -> np.ndarray:
    from ..images import decode_pil
    return np.asarray(decode_pil(pipe, latents)[0])


def _psnr(pipe, latents, against=None) -> float:
    """PSNR of decoded latents against the exercise scene's input image (or `against`, a uint8 image)."""
    from ..metrics import psnr
    return psnr(_u8(pipe, latents), _ex(pipe).image if against is None else against)


def _vae(pipe) -> np.ndarray:
    store = _store(pipe)
    if ("03", "vae") not in store:
        store[("03", "vae")] = _u8(pipe, _ex(pipe).z)
    return store[("03", "vae")]


def _ddim_psnr(pipe, g: float, steps: int = STEPS_03, against: str = "input") -> float:
    """03.1's reference: DDIM inversion (guidance 1) at `steps`, reconstructed at guidance g."""
    from ..inversion import ddim_inversion, reconstruct
    store = _store(pipe)
    key = ("03", "ddim", steps)
    if key not in store:
        e = _ex(pipe)
        store[key] = ddim_inversion(pipe, e.z, e.prompt, steps)
    pkey = ("03", "ddim psnr", steps, float(g), against)
    if pkey not in store:
        rec = reconstruct(pipe, store[key], guidance=float(g))
        store[pkey] = _psnr(pipe, rec, _vae(pipe) if against == "vae" else None)
    return store[pkey]


def _nti(pipe, steps: int = STEPS_03, **options) -> SimpleNamespace:
    """A null-text inversion of the exercise scene (guidance GUIDANCE_03) with schedule `options`, cached:
    the Inversion, its UNet evaluations and the PSNR of its reconstruction against the input."""
    from ..inversion import null_text_inversion, reconstruct
    store = _store(pipe)
    if options.get("tol_scale") == 1:       # the reference schedule's values: one cache entry for it
        options.pop("tol_scale")
    if options.get("optimise_steps") is not None and options["optimise_steps"] >= steps:
        options.pop("optimise_steps")
    key = ("03", "nti", steps, tuple(sorted(options.items())))
    if key not in store:
        e = _ex(pipe)
        with _frozen(pipe.unet):
            inv = null_text_inversion(pipe, e.z, e.prompt, steps, GUIDANCE_03, progress=False, **options)
        store[key] = SimpleNamespace(inv=inv, evals=inv.evals, psnr=_psnr(pipe, reconstruct(pipe, inv)))
    return store[key]


def _nti_psnr_other(pipe, ref: SimpleNamespace, how: str) -> float:
    """The reconstruction of a cached inversion scored the wrong way: at guidance 1, or against the VAE round trip."""
    from ..inversion import reconstruct
    store = _store(pipe)
    key = ("03", "nti other", id(ref.inv), how)
    if key not in store:
        rec = reconstruct(pipe, ref.inv, guidance=1.0 if how == "guidance 1" else None)
        store[key] = _psnr(pipe, rec, _vae(pipe) if how == "vae" else None)
    return store[key]


def _swap_inversion(pipe):
    from ..inversion import negative_prompt_inversion
    store = _store(pipe)
    if ("03", "npi") not in store:
        e = _ex(pipe)
        store[("03", "npi")] = negative_prompt_inversion(pipe, e.z, e.prompt, STEPS_03, SWAP_GUIDANCE_03)
    return store[("03", "npi")]


def _edit(pipe, blend: bool, **kw):
    """helpers.p2p.edit of the exercise swap on the negative-prompt inversion at SWAP_GUIDANCE_03, cached."""
    from ..p2p import edit
    store = _store(pipe)
    key = ("03", "edit", blend, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key not in store:
        e = _ex(pipe)
        store[key] = edit(pipe, _swap_inversion(pipe), e.swap_prompt, "swap",
                          blend=("circle", "square") if blend else None, **kw)
    return store[key]


def _float_keys(ans, want, what: str):
    """{float(key): value} when `ans` is a dict with exactly the keys `want`, else (None, a hint)."""
    if not isinstance(ans, dict):
        return None, f"expected a dict {{{what}: …}} for {what} in {list(want)}, got {type(ans).__name__}"
    if not all(_number(k) for k in ans) or {float(k) for k in ans} != {float(w) for w in want} or len(ans) != len(want):
        return None, f"expected the keys {list(want)} ({what}), got {list(ans)}"
    return {float(k): v for k, v in ans.items()}, None


# -- 03.1 guidance sweep -----------------------------------------------------------------------------------------
def check_03_1(answer, pipe=None, strict: bool = False):
    """03.1 Guidance sweep. answer: {g: PSNR (dB)} for g in 1, 2, 4, 7.5: plain DDIM inversion of the exercise
    scene (guidance 1, STEPS_03 steps), reconstructed at guidance g, against the input image."""
    def grade(ans):
        _check_pipe(pipe)
        value, hint = _float_keys(ans, GUIDANCES_03_1, "guidance")
        if hint:
            return hint
        for g in GUIDANCES_03_1:
            v = value[g]
            hint = _psnr_hint(v, f"at guidance {g:g}")
            if hint:
                return hint
            if _close(v, _ddim_psnr(pipe, g), PSNR_TOL):
                continue
            where = f"at guidance {g:g}"
            for o in GUIDANCES_03_1:
                if o != g and _close(v, _ddim_psnr(pipe, o), PSNR_TOL):
                    return (f"{where}: {float(v):.2f} dB is the reconstruction at guidance {o:g}: pass "
                            f"guidance={g:g} to reconstruct (it defaults to the inversion's own guidance, 1)")
            if _close(v, _ddim_psnr(pipe, g, against="vae"), PSNR_TOL):
                return (f"{where}: you compared with the VAE round trip; compare the reconstruction with the "
                        "input image, ex_sc.image (the round trip is the ceiling, not the target)")
            return (f"{where}: {float(v):.2f} dB is not the PSNR of the DDIM inversion of ex_z under ex_prompt "
                    f"(EX_STEPS = {STEPS_03} steps, not the notebook's STEPS; guidance 1) reconstructed at "
                    f"guidance {g:g}, against ex_sc.image")
        return None
    return _verdict("03.1", answer, grade, strict)


# -- 03.2 cheaper schedules -------------------------------------------------------------------------------------
def _evals_hint(evals, where: str) -> str | None:
    """A hint for a UNet-evaluation count that is not a whole number, or that is the cost of another step count."""
    if not _number(evals) or float(evals) != int(evals):
        return f"{where}: the UNet evaluations are a whole number (inv.evals), got {evals!r}"
    per_step = 1 + 1 + 10 + 1      # per step: pivot (1), conditional prediction (1), 10 inner iterations, advance (1)
    e = int(evals)
    if e != STEPS_03 * per_step and e % per_step == 0:
        return (f"{where}: {e} evaluations is what a {e // per_step}-step inversion costs when every step uses its "
                f"10 iterations; the exercises use EX_STEPS = {STEPS_03} steps")
    return None


def check_03_2(answer, pipe=None, strict: bool = False):
    """03.2 Cheaper schedules. answer: {name: (UNet evaluations, PSNR)} for each name of SCHEDULES_03_2: null-text
    inversion of the exercise scene (STEPS_03 steps, guidance 7.5) with those schedule options, reconstructed,
    against the input image."""
    def grade(ans):
        _check_pipe(pipe)
        names = list(SCHEDULES_03_2)
        if not isinstance(ans, dict) or set(ans) != set(names):
            got = sorted(map(str, ans)) if isinstance(ans, dict) else type(ans).__name__
            return f"expected a dict with the keys {names} (one pair each), got {got}"
        for n in names:
            pair, where, kw = ans[n], f"{n!r}", SCHEDULES_03_2[n]
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                return f"{where}: expected a pair (inv.evals, PSNR), got {pair!r}"
            evals, p = pair
            ref = _nti(pipe, **kw)
            if not (_number(evals) and int(evals) == ref.evals):
                hint = _evals_hint(evals, where)
                if hint:
                    return hint
                slips = [f"the cost of {o!r}" for o in names
                         if o != n and _nti(pipe, **SCHEDULES_03_2[o]).evals == int(evals)]
                if "tol_scale" in kw and int(evals) == _nti(pipe, tol=float(kw["tol_scale"])).evals:
                    slips.append(f"the cost with tol={kw['tol_scale']}, which replaces the bar's base (1e-5) where "
                                 "tol_scale multiplies the whole bar (1e-5 + 2e-5·i)")
                if slips:
                    options = ", ".join(f"{k}={v}" for k, v in kw.items()) or "no options"
                    return f"{where}: {int(evals)} evaluations is {' or '.join(slips)}: pass {options}"
                return (f"{where}: {int(evals)} UNet evaluations; null-text inversion of ex_z under ex_prompt "
                        f"({STEPS_03} steps, guidance {GUIDANCE_03:g}, {n}) spends {ref.evals} "
                        "(inv.evals counts the pivot too)")
            hint = _psnr_hint(p, where)
            if hint:
                return hint
            if _close(p, ref.psnr, PSNR_TOL):
                continue
            if _close(p, _nti_psnr_other(pipe, ref, "guidance 1"), PSNR_TOL):
                return (f"{where}: that PSNR is the reconstruction at guidance 1; null-text inversion is made for "
                        "its own guidance (reconstruct(pipe, inv) uses it)")
            if _close(p, _nti_psnr_other(pipe, ref, "vae"), PSNR_TOL):
                return f"{where}: you compared with the VAE round trip; compare with the input image, ex_sc.image"
            return (f"{where}: the evaluations are right, the PSNR is not: reconstruct(pipe, inv), decode (u8) and "
                    "compare with ex_sc.image")
        return None
    return _verdict("03.2", answer, grade, strict)


# -- 03.3 blend settings -----------------------------------------------------------------------------------------
def _blend_numbers(pipe, e) -> tuple[float, float, float]:
    """(share of the latent grid the blend mask covers, PSNR outside the region, PSNR of the whole image)."""
    from ..metrics import psnr
    ex = _ex(pipe)
    out = _u8(pipe, e.edited)
    return (float(e.mask.float().mean()), psnr(out, ex.image, mask=~ex.region), psnr(out, ex.image))


def check_03_3(answer, pipe=None, strict: bool = False, tol: float = 1e-3):
    """03.3 Blend settings. answer: {name: (mask share, PSNR outside)} for each name of BLEND_SETTINGS_03_3: the
    word swap with local blending on ex_inv, preset="reference" with that override; the share of the latent grid
    its last blend mask covers, and the PSNR of the edited image against the input outside ex_region."""
    def grade(ans):
        _check_pipe(pipe)
        names = list(BLEND_SETTINGS_03_3)
        if not isinstance(ans, dict) or set(ans) != set(names):
            got = sorted(map(str, ans)) if isinstance(ans, dict) else type(ans).__name__
            return f"expected a dict with the keys {names} (one pair each), got {got}"
        ref = {n: _blend_numbers(pipe, _edit(pipe, True, preset="reference", **kw))
               for n, kw in BLEND_SETTINGS_03_3.items()}
        for n in names:
            pair, where = ans[n], f"{n!r}"
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                return f"{where}: expected a pair (mask share, PSNR outside), got {pair!r}"
            share, p = pair
            if not _number(share) or not 0 <= float(share) <= 1:
                return f"{where}: the mask share is a fraction of the latent grid in [0, 1] (e.mask.float().mean())"
            if not _close(share, ref[n][0], tol):
                course = _blend_numbers(pipe, _edit(pipe, True, preset="course", **BLEND_SETTINGS_03_3[n]))[0]
                if _close(share, course, tol) and not _close(course, ref[n][0], tol):
                    return (f"{where}: your mask covers {_pct(float(share))} of the latent grid, as the course's "
                            "preset does (edit's default): pass preset=\"reference\" as well as the override")
                for o in names:
                    if o != n and _close(share, ref[o][0], tol) and not _close(ref[o][0], ref[n][0], tol):
                        return (f"{where}: your mask covers {_pct(float(share))} of the latent grid, as the setting "
                                f"{o!r} does: pass **BLEND_SETTINGS_03_3[{n!r}] to edit")
                return (f"{where}: your mask covers {_pct(float(share))} of the latent grid; the word swap on ex_inv "
                        f"with blend=(\"circle\", \"square\"), preset=\"reference\" and this override covers "
                        f"{_pct(ref[n][0])}")
            hint = _psnr_hint(p, where)
            if hint:
                return hint
            if _close(p, ref[n][1], PSNR_TOL):
                continue
            if _close(p, ref[n][2], PSNR_TOL):
                return f"{where}: that is the PSNR of the whole image; measure outside ex_region only (mask=~ex_region)"
            return (f"{where}: the mask is right; the PSNR outside is {ref[n][1]:.2f} dB: psnr(edited image, "
                    "ex_sc.image, mask=~ex_region), the edit decoded with u8(e.edited)")
        return None
    return _verdict("03.3", answer, grade, strict)


# -- 03.4 word swap across token counts --------------------------------------------------------------------------
def refine_positions_03(tokenizer, source: str, target: str) -> list[int]:
    """Positions of the target prompt's own tokens (start, end and padding excluded) that refinement leaves with
    their own attention (token_mapping gives them -1)."""
    from ..p2p import token_mapping
    m = token_mapping(tokenizer, source, target, "refine")
    n = len(tokenizer(target).input_ids)
    return [i for i in range(1, n - 1) if int(m[i]) < 0]


def check_03_4(answer, pipe=None, strict: bool = False):
    """03.4 Word swap across token counts. answer: the positions in the prompt ex_prompt.replace("circle", "circles")
    whose tokens keep their own attention under refinement (start, end token and padding excluded)."""
    def grade(ans):
        _check_pipe(pipe)
        tok, e = pipe.tokenizer, _ex(pipe)
        target = e.prompt.replace("circle", "circles")
        want = refine_positions_03(tok, e.prompt, target)
        n = len(tok(target).input_ids)
        try:
            got = sorted(int(p) for p in (ans.tolist() if hasattr(ans, "tolist") else ans))
        except (TypeError, ValueError):
            return f"expected a list of token positions (integers), got {ans!r}"
        if got == want:
            return None
        pieces = [t for i, t in enumerate(tok.convert_ids_to_tokens(tok(target).input_ids)) if i in want]
        extra = [p for p in got if p >= n - 1]
        if extra:
            return (f"positions {extra} are the end token ({n - 1}) or padding after it; list only the prompt's own "
                    f"tokens, 1 … {n - 2}")
        if 0 in got:
            return "position 0 is the start token, which both prompts share: it borrows the source's attention"
        if got == [p - 1 for p in want]:
            return "off by one: position 0 is the start token, so the prompt's first word is at position 1"
        if len(got) < len(want) and set(got) < set(want):
            return (f"'circles' is {len(want)} tokens here, {pieces}: list every one of them "
                    "(helpers.text.describe_tokens shows each token with its position)")
        shared = sorted(set(got) - set(want))
        if shared:
            return (f"the tokens at {shared} also occur, in the same order, in the source prompt: refinement aligns "
                    "them, so they borrow the source's attention")
        return f"{got} are not the positions refinement leaves with their own attention"
    return _verdict("03.4", answer, grade, strict)


# -- 03.5 sharing self-attention everywhere ----------------------------------------------------------------------
def check_03_5(answer, pipe=None, strict: bool = False):
    """03.5 Your own processor. answer: the edited sample's latents (1 × C × h × w) of the word swap on ex_inv, with
    the notebook's SwapProcessor changed to share self-attention at every layer and at every step (cross-attention
    for the first 80% of the steps, as edit's default), no blending."""
    def grade(ans):
        _check_pipe(pipe)
        target = _edit(pipe, False, self_max=1.0, self_steps=1.0).edited
        if not isinstance(ans, torch.Tensor):
            return f"expected the edited sample's latents (a tensor, e.g. mine[1:]), got {type(ans).__name__}"
        x = ans.detach().to("cpu", torch.float32)
        target = target.to("cpu", torch.float32)
        if x.ndim == 4 and x.shape[0] == 2 and x.shape[1:] == target.shape[1:]:
            return "expected only the edited sample, mine[1:] (the batch holds [source, edited])"
        if tuple(x.shape) != tuple(target.shape):
            return f"expected latents of shape {tuple(target.shape)} (the edited sample), got {tuple(x.shape)}"
        scale = max(1.0, float(target.abs().max()))

        def near(y):
            return float((x - y.to("cpu", torch.float32)).abs().max()) <= LATENT_TOL * scale

        if near(target):
            return None
        from ..inversion import reconstruct
        inv, ex = _swap_inversion(pipe), _ex(pipe)
        steps = inv.steps
        variants = [
            (lambda: _edit(pipe, False, self_max=1.0, self_steps=1.0, cross_steps=1.0).edited,
             f"cross-attention is replaced at all {steps} steps: n_cross is 80% of EX_STEPS, "
             f"round(0.8 * EX_STEPS) = {round(0.8 * steps)}, not of the notebook's STEPS (and the callback must "
             "advance proc.step)"),
            (lambda: _edit(pipe, False, self_max=1.0).edited,
             f"self-attention is shared at every layer but only for the first half of the steps: set n_self = "
             f"EX_STEPS ({steps})"),
            *[(lambda p=p: _edit(pipe, False, self_steps=1.0, preset=p).edited,
               f"self-attention is shared at every step but only at the layers up to the {p!r} preset's cap: set "
               "cap = max(LATENT)") for p in ("course", "reference")],
            *[(lambda p=p: _edit(pipe, False, preset=p).edited,
               f"this is the {p!r} preset's default swap (self-attention at the small layers, half the steps): set "
               "cap = max(LATENT) and n_self = EX_STEPS") for p in ("course", "reference")],
            (lambda: reconstruct(pipe, inv, ex.swap_prompt),
             "no attention was shared: is your processor installed (pipe.unet.set_attn_processor(proc)) while "
             "you sample, and do n_cross and n_self count steps (not 0)?"),
            (lambda: reconstruct(pipe, inv),
             "that is the source branch (mine[:1]) or a reconstruction of ex_prompt: take the edited sample, "
             "mine[1:]"),
        ]
        for ref, hint in variants:
            if near(ref()):
                return hint
        gap = float((x - target).abs().max())
        return (f"your latents differ from the swap with self-attention shared everywhere by up to {gap:.3g}: "
                f"sample from ex_inv ({steps} steps, guidance {inv.guidance:g}) with [ex_prompt, ex_swap_prompt] "
                "and the callback that advances proc.step")
    return _verdict("03.5", answer, grade, strict)
