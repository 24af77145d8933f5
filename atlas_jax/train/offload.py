"""trainer.offload: optimizer state in host memory (frozen parameters: not yet).

On GPU/TPU the Adam moments are twice the trained parameters; kept in `pinned_host`
memory they cost no device memory between steps. The step moves them to the device for
the update and writes the new state back to the host (`fetch` below, and the pinned_host
out_shardings of the state): XLA overlaps those copies with compute where it can.
On CPU the host IS the device memory, so offloading buys nothing: `resolve` says so once
and returns "none".
"""

from __future__ import annotations

import jax

from atlas_jax.config import ConfigError, OFFLOAD

HOST, DEVICE = "pinned_host", "device"


def resolve(mode: str, mesh) -> str:
    """The offload mode that will actually run on `mesh` ("none" on CPU, with a message)."""
    if mode not in OFFLOAD:
        raise ConfigError(f"trainer.offload={mode!r} is not one of {', '.join(OFFLOAD)}")
    if mode == "none":
        return mode
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        print(f"trainer.offload={mode}: ignored on CPU (host and device memory are the same)", flush=True)
        return "none"
    if mode == "optimizer_and_frozen":  # eval/log-prob passes would need the same fetch first
        print("trainer.offload=optimizer_and_frozen: frozen parameters stay on the device "
              "(not supported yet); offloading the optimizer state only", flush=True)
        mode = "optimizer"
    kinds = {m.kind for m in device.addressable_memories()}
    if HOST not in kinds:
        raise ConfigError(f"trainer.offload={mode}: {device.platform} devices have no {HOST} memory "
                          f"(memory kinds: {', '.join(sorted(kinds))})")
    return mode


def on_host(shardings):
    """The same shardings in pinned host memory."""
    return jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings)


def fetch(tree, shardings):
    """Inside a jitted step: host-resident leaves -> device memory (others untouched)."""
    def move(x, s):
        if getattr(s, "memory_kind", None) == HOST:
            return jax.device_put(x, s.with_memory_kind(DEVICE))
        return x
    return jax.tree.map(move, tree, shardings)


def state_shardings(shardings, mode: str):
    """TrainState shardings with the optimizer state on the host when `mode` says so."""
    if mode == "none":
        return shardings
    return shardings.replace(opt_state=on_host(shardings.opt_state))


def apply(state, shardings, frozen, mode: str):
    """(state, shardings, frozen) moved to where `mode` keeps them (a no-op for "none")."""
    if mode == "none":
        return state, shardings, frozen
    shardings = state_shardings(shardings, mode)
    return jax.device_put(state, shardings), shardings, frozen
