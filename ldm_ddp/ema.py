"""Exponential moving averages of the UNet weights: several profiles at once, fp32 shadows, foreach updates.

Every profile is one fp32 copy of the trainable parameters, and all of them go in the same checkpoint:
- fixed decay: shadow <- d * shadow + (1 - d) * weights per update, d warmed up as min(d, (1 + n) / (10 + n))
  (diffusers' EMAModel). `ema.decay` is the default profile (tensors `ema.<name>`, `--weights ema`);
  `ema.extra_decays` keeps more (tensors `ema_0p9999.<name>`, `--weights ema:0.9999`).
- power function (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
  eq. 2-3): decay (1 - 1/n)^(gamma + 1) at update n, so the average spans a fixed *fraction* of the updates so
  far (relative width sigma_rel) whatever the training length. `ema.power_stds` lists sigma_rel values
  (tensors `ema_std0p1.<name>`, `--weights ema:std=0.1`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from .config import ConfigError, EMAConfig

MAX_POWER_STD = 0.28  # sigma_rel = sqrt(1/12) ~ 0.2887 is gamma = 0 (a plain running mean);
# above it gamma < 0


@cache
def power_exponent(std: float) -> float:
    """sigma_rel -> gamma: largest real root of sigma^2 = (gamma+1) / ((gamma+2)^2 (gamma+3))
    (edm2's std_to_exp)."""
    s = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


@dataclass(frozen=True)
class Profile:
    """One EMA: kind "decay" (fixed decay per update, `value` = d) or "power" (`value` = sigma_rel)."""
    kind: str
    value: float
    default: bool = False  # the profile of `ema.decay`: tensors `ema.<name>`, picked by `--weights ema`

    @property
    def name(self) -> str:
        """What `--weights` takes: ema, ema:0.9999 or ema:std=0.1."""
        if self.default:
            return "ema"
        return f"ema:{self.value!r}" if self.kind == "decay" else f"ema:std={self.value!r}"

    @property
    def prefix(self) -> str:
        """Tensor-name prefix in the checkpoint (no dot inside: the first dot ends the prefix)."""
        if self.default:
            return "ema"
        return "ema_" + ("" if self.kind == "decay" else "std") + repr(self.value).replace(".", "p")

    def decay(self, n: int, warmup: bool) -> float:
        """Decay of update n (0-based count of updates already applied)."""
        if self.kind == "power":  # (1 - 1/t)^(gamma + 1) with t = n + 1 updates; 0 at the first one
            # (a copy, to an ulp)
            return (1 - 1 / (n + 1)) ** (power_exponent(self.value) + 1)
        return min(self.value, (1 + n) / (10 + n)) if warmup else self.value

    def meta(self) -> dict:
        value = {"decay": self.value} if self.kind == "decay" else {
            "std": self.value, "gamma": round(power_exponent(self.value), 4)}
        return {"name": self.name, "tensors": self.prefix, **value}


def profiles_of(cfg: EMAConfig) -> list[Profile]:
    """The configured profiles, default first; ConfigError for a value that cannot be one."""
    for key, values, ok, expected in (
            ("ema.extra_decays", cfg.extra_decays, lambda v: 0 <= v < 1, "decays in [0, 1)"),
            ("ema.power_stds", cfg.power_stds, lambda v: 0 < v <= MAX_POWER_STD,
             f"sigma_rel in (0, {MAX_POWER_STD}]")):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v) for v in values):
            raise ConfigError(f"{key}: expected a list of {expected}, got {values!r}")
    profiles = [Profile("decay", float(cfg.decay), default=True)]
    profiles += [Profile("decay", float(d)) for d in cfg.extra_decays if float(d) != cfg.decay]
    profiles += [Profile("power", float(s)) for s in cfg.power_stds]
    return list(dict.fromkeys(profiles))  # drop repeats, keep order


def checkpoint_profiles(meta: dict) -> list[dict]:
    """A checkpoint's `ema` metadata -> its profiles' meta() dicts;
    a checkpoint from before profiles has one."""
    return meta.get("profiles") or [{"name": "ema", "tensors": "ema", "decay": meta.get("decay")}]


def _parse(weights: str) -> tuple[str, float]:
    body = weights.split(":", 1)[1]
    kind, number = ("power", body[4:]) if body.startswith("std=") else ("decay", body)
    try:
        return kind, float(number)
    except ValueError:
        raise ConfigError("--weights: expected ema | raw | ema:DECAY | ema:std=SIGMA_REL, "
                          f"got {weights!r}") from None


def _stored_prefix(stored: list[dict], kind: str, value: float) -> str | None:
    """The tensor prefix of the stored profile (checkpoint_profiles) of this kind and value, or None."""
    key = "std" if kind == "power" else "decay"
    return next((p["tensors"] for p in stored
                 if p.get(key) is not None and abs(p[key] - value) <= 1e-12), None)


def weights_prefix(meta: dict, weights: str) -> str:
    """`--weights` (raw | ema | ema:0.9999 | ema:std=0.1) -> the checkpoint's tensor prefix
    (unet, ema, ...)."""
    if weights == "raw":
        return "unet"
    profiles = checkpoint_profiles(meta)
    if weights == "ema":
        return "ema"
    if not weights.startswith("ema:"):
        raise ConfigError(f"--weights: expected ema | raw | ema:DECAY | ema:std=SIGMA_REL, got {weights!r}")
    prefix = _stored_prefix(profiles, *_parse(weights))
    if prefix is not None:
        return prefix
    have = ", ".join(["raw"] + [p["name"] + (f" (decay {p['decay']})" if p["name"] == "ema" else "")
                                for p in profiles])
    raise ConfigError(f"--weights: no EMA profile {weights!r} in this checkpoint (it has: {have})")


CHUNK_ELEMENTS = 2**26  # EMA update temporaries: 256 MiB of fp32 at a time
COMPILE_BACKEND = "inductor"  # of EMA.compile (the tests use another: no C++ compiles there)


def _lerp_toward(shadow: list[torch.Tensor], current: list[torch.Tensor], weight: torch.Tensor) -> None:
    """shadow += weight * (current - shadow): EMA.update's three multi-tensor passes, for torch.compile to
    fuse into one pass that reads both lists once, writes the shadow once and needs no temporaries."""
    torch._foreach_add_(shadow, torch._foreach_mul(torch._foreach_sub(current, shadow), weight))


def _chunk_ranges(sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive index ranges of tensors with these sizes, each at most CHUNK_ELEMENTS
    (or one larger tensor)."""
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if total and total + size > CHUNK_ELEMENTS:
            ranges.append((start, i))
            start, total = i, 0
        total += size
    return ranges + [(start, len(sizes))]


class EMA:
    """fp32 shadow copies of a module's parameters, one set per profile (buffers are copied, not averaged)."""

    def __init__(self, module: torch.nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.profiles = profiles_of(cfg)
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadows = [[params[n].detach().float().clone() for n in self.names] for _ in self.profiles]
        self.chunks = _chunk_ranges([t.numel() for t in self.shadows[0]])  # of update()'s temporaries
        self.one_pass = None  # on a GPU with Triton: the update in one pass (ema_kernel), the same bits
        if self.names and self.shadows[0][0].is_cuda:  # (Triton imported only there)
            from .ema_kernel import one_pass_for
            self.one_pass = one_pass_for(self.shadows)
        self.num_updates = 0  # EMA updates applied so far (drives the decay warmup and the power profiles)
        self.fused = None  # the compiled update, built by compile() (scripts/bench.py --ema-compile)
        # defer_updates (scripts/bench.py's ema_beside_forward variant): update() leaves its update pending,
        # launch_pending() runs it on `stream`.
        self.deferring, self.stream = False, None
        self.pending = None  # (module, weight per profile) of the update not applied yet
        self.in_flight = None  # the weights the updates on `stream` read, kept alive until settle()

    def compile(self) -> None:
        """Update through torch.compile of _lerp_toward (one graph for every profile and step: the weight is a
        device tensor; compiled at the first update, or at probe())."""
        self.fused = torch.compile(_lerp_toward, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)

    @torch.no_grad()
    def probe(self, module: torch.nn.Module) -> None:
        """Build the compiled update now, with a weight of 0 (the shadow keeps its values): a compile error
        shows before step 1."""
        current = self._weights(module)
        self.fused(self.shadows[0], current, torch.zeros((), device=current[0].device))

    def _weights(self, module: torch.nn.Module) -> list[torch.Tensor]:
        """The module's trainable weights in the shadows' order, fp32
        (no copy for fp32; one dtype for foreach)."""
        params = dict(module.named_parameters())
        return [params[n].detach().float() for n in self.names]

    @property
    def shadow(self) -> list[torch.Tensor]:
        """The default profile's shadow (`ema.decay`), every update applied."""
        self.settle()
        return self.shadows[0]

    def decay(self) -> float:
        """Default profile's decay for the next update; with warmup min(decay, (1 + n) / (10 + n))."""
        return self.profiles[0].decay(self.num_updates, self.cfg.warmup)

    def wants_update(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based count of updates done) updates the EMA."""
        return step % self.cfg.update_every == 0

    def defer_updates(self, device: torch.device) -> None:
        """The EMA beside the next forward (measured in scripts/bench.py, not used by the trainer: it gained
        nothing steady on an H200). update() only computes the update's weights; the shadows move when the
        next step starts (launch_pending, called by the training loop before the forward), on a side CUDA
        stream, so the EMA's memory-bound passes over the weights run beside the forward's matmuls instead of
        after the optimizer. The weights it reads are unchanged until then (the optimizer step settles first),
        so every bit is the same as updating at once. (CPU: no side stream; launch_pending applies the update
        there and then.)"""
        self.deferring = True
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @torch.no_grad()
    def launch_pending(self, beside: bool = True) -> None:
        """Apply the pending update now: on the side stream after the work queued so far on the current one,
        or (`beside` False, or no side stream) on the current stream."""
        if self.pending is None:
            return
        (module, weights), self.pending = self.pending, None
        if not beside or self.stream is None:
            self._apply(module, weights)
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        # Autocast off, should the caller be under it: ema.compile's graph is built without it.
        with torch.cuda.stream(self.stream), torch.autocast("cuda", enabled=False):
            self._apply(module, weights)
        self.in_flight = (self.in_flight or []) + weights

    @torch.no_grad()
    def settle(self) -> None:
        """Every update so far in the shadows, as the current stream sees them: before the optimizer changes
        the weights a pending update reads, and before the shadows are read or written (each method here
        does). The update in flight on the side stream first, then any pending one on this stream: they write
        the same shadows."""
        if self.in_flight is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
            self.in_flight = None
        self.launch_pending(beside=False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, ok: torch.Tensor | None = None) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights for every profile.

        `ok` (a bool tensor on the device): False leaves every shadow as it was (a skipped step) without a
        host sync; the decay schedule advances either way, as the learning rate follows the step count.

        The weight is a device scalar (1 - decay, or 0 when not ok), which foreach lerp only takes per tensor
        (one kernel and one launch per parameter: 686 for SD1.5). So lerp's own formula for weights below 1/2,
        shadow += w * (weights - shadow) (exact where weights == shadow, no drift from rounding 1 - w), in
        three multi-tensor kernels, a chunk of CHUNK_ELEMENTS at a time to bound the temporary; on a GPU with
        Triton one kernel does the three in one pass for every profile, rounding as they do (ema_kernel). One
        path with or without `ok`, so both give the same bits. For weights of 1/2 and above (the decay
        warmup's first updates, a power profile's first update, which copies) the result may differ from
        lerp's by one ulp of the shadow. After defer_updates the update is left pending, for launch_pending or
        settle to apply.
        """
        self.settle()
        take = torch.ones((), device=self.shadows[0][0].device) if ok is None else ok.float()
        weights = [take * (1.0 - p.decay(self.num_updates, self.cfg.warmup)) for p in self.profiles]
        self.num_updates += 1
        if self.deferring:
            self.pending = (module, weights)
        else:
            self._apply(module, weights)

    def _apply(self, module: torch.nn.Module, weights: list[torch.Tensor]) -> None:
        current = self._weights(module)
        if self.fused is None and self.one_pass is not None and self.one_pass.fits(current):
            self.one_pass(current, weights)
            return
        for weight, shadow in zip(weights, self.shadows):
            if self.fused is not None:
                self.fused(shadow, current, weight)
                continue
            for a, b in self.chunks:
                step = torch._foreach_sub(current[a:b], shadow[a:b])
                torch._foreach_mul_(step, weight)
                torch._foreach_add_(shadow[a:b], step)

    @torch.no_grad()
    def copy_from(self, module: torch.nn.Module) -> None:
        """Reset every shadow to the module's weights (before ema.start_step)."""
        self.settle()
        params = dict(module.named_parameters())
        for shadow in self.shadows:
            torch._foreach_copy_(shadow, [params[n].detach() for n in self.names])

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module, weights: str = "ema") -> None:
        """Write a profile's shadow (by `--weights` name, default the default profile) into `module`."""
        self.settle()
        index = [p.prefix for p in self.profiles].index(weights_prefix(self.state_meta(), weights))
        params = dict(module.named_parameters())
        for name, value in zip(self.names, self.shadows[index]):
            params[name].copy_(value)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self.settle()
        return {f"{p.prefix}.{n}": t for p, shadow in zip(self.profiles, self.shadows)
                for n, t in zip(self.names, shadow)}

    def state_meta(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.cfg.decay, "warmup": self.cfg.warmup,
                "update_every": self.cfg.update_every, "start_step": 0,
                "profiles": [p.meta() for p in self.profiles]}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore every configured profile, matched by value;
        the default one from `ema.*` if ema.decay changed."""
        self.settle()
        stored = checkpoint_profiles(meta)
        for profile, shadow in zip(self.profiles, self.shadows):
            prefix = (_stored_prefix(stored, profile.kind, profile.value)
                      or ("ema" if profile.default else None))
            if prefix is None:
                raise ConfigError(f"ema: the checkpoint has no EMA profile {profile.name} (it has "
                                  f"{', '.join(p['name'] for p in stored)}); resume with the same "
                                  "ema.extra_decays and ema.power_stds, or start over with "
                                  "--ckpt.resume=none")
            missing = [n for n in self.names if f"{prefix}.{n}" not in tensors]
            if missing:
                raise KeyError(f"checkpoint lacks EMA weights for {missing[0]} (and {len(missing) - 1} more)")
            for name, value in zip(self.names, shadow):
                value.copy_(tensors[f"{prefix}.{name}"])
        self.num_updates = int(meta["num_updates"])
