"""trainer.offload: optimizer state, and with LoRA the frozen base, in host memory.

On GPU/TPU the Adam moments are twice the trained parameters; kept in `pinned_host`
memory they cost no device memory during the forward and backward passes. The step
moves them to the device for the update and writes the new state back to the host
(`fetch` below, and the pinned_host out_shardings of the state).
`optimizer_and_frozen` also keeps LoRA's frozen base (and QLoRA's 4-bit codes) on the
host: the model copies each layer's weights in where the layer runs, inside its scan
(forward, backward, log-prob passes, generation: see `parallel.on_device`), so about one
layer of the base is on the device at a time, at the price of streaming the base over the
host link on every pass. Without LoRA there is no frozen base: the optimizer alone moves.
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
    if mode == "optimizer_and_frozen":
        if frozen is None:
            print("trainer.offload=optimizer_and_frozen: no frozen parameters without LoRA "
                  "(model.lora.rank=0); offloading the optimizer state only", flush=True)
        else:
            frozen = jax.device_put(frozen, on_host(jax.tree.map(lambda x: x.sharding, frozen)))
    shardings = state_shardings(shardings, mode)
    return jax.device_put(state, shardings), shardings, frozen
