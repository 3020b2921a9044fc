"""The weights side of ``TrainEngine``: the full fp32 state dict (gathering fp32 masters, expert shards and
the frozen bf16 weights' exact values), loading one, and exporting it as safetensors (streamed tensor by
tensor under ``checkpoint_format: sharded``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class EngineWeights:
    """Mixed into ``TrainEngine`` (which sets ``model``, ``cfg``, ``rank``, ``step``, ``_muon``,
    ``frozen_low``, ``_frozen_file`` and ``barrier``)."""

    model: nn.Module
    cfg: Any
    rank: int
    step: int
    _muon: Any
    frozen_low: set[str]
    _frozen_file: Any

    def barrier(self) -> None:  # TrainEngine's
        raise NotImplementedError

    def _expert_params(self) -> dict[str, nn.Parameter]:
        """{state-dict name: param} of this rank's expert shards (empty without expert parallelism)."""
        from kimivl_model.moe_ep import expert_param_names

        params = dict(self.model.named_parameters())
        return {n: params[n] for n in expert_param_names(self.model)}

    # ------------------------------------------------------------------------------- state
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full-precision ``model.state_dict()`` (params + persistent buffers) on CPU.

        Frozen weights held in bf16 come from ``frozen_source`` (unchanged since the phase started). With
        bf16 working weights the fp32 masters replace those params, and with expert parallelism the expert
        shards are gathered into the whole stacks: then this is a collective (every rank calls it) and ranks
        other than 0 get ``{}``."""
        lowp = self._muon is not None and bool(self._muon.low_precision)
        experts = self._expert_params()
        if not lowp and not experts:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            masters = self._muon.master_weights(dst=0) if lowp else {}
            sd = self.model.state_dict(keep_vars=True)
            if experts:
                from kimivl_model.moe_ep import gather_full_experts

                shards = {n: masters.get(id(sd[n]), sd[n]) for n in experts}
                gathered = gather_full_experts(self.model, shards, skip=self.frozen_low, dst=0)
            if self.rank != 0:
                return {}
            state = {
                k: masters[id(v)] if id(v) in masters else v.detach().to("cpu", copy=True)
                for k, v in sd.items()
            }
            if experts:
                state.update({n: gathered[n] for n in experts if n not in self.frozen_low})
        for name in self.frozen_low:  # frozen bf16 weights: the exact fp32 values of the starting checkpoint
            state[name] = self._frozen_file[name]
        return state

    def load_full_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """``model.load_state_dict(weights, strict=True)`` from a full state dict (whole expert stacks, cut
        to this rank's experts with expert parallelism)."""
        from kimivl_model.moe_ep import expert_slices

        mine = expert_slices(self.model, dict(weights))
        self.model.load_state_dict(mine, strict=True)

    def reset_master_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """bf16 working weights: fp32 masters <- ``weights`` (a full state dict), for a weights-only resume."""
        if self._muon is None or not self._muon.low_precision:
            return
        from kimivl_model.moe_ep import expert_slices

        mine = expert_slices(self.model, dict(weights))
        sd = self.model.state_dict(keep_vars=True)
        self._muon.set_master_weights({id(sd[k]): mine[k] for k in sd if k in mine})

    def export_weights(self, path: Path) -> Path:
        """Write the full fp32 weights as safetensors (rank 0) for the next stage; returns ``path``. With
        ``checkpoint_format: sharded`` the file is streamed tensor by tensor (``_stream_weights``): no
        process ever holds the whole model; otherwise rank 0 gathers the state dict and writes it."""
        from tasks.io.weights import save_safetensors_atomic

        path = Path(path)
        if self.cfg.checkpoint_format == "sharded":
            self._stream_weights(path)
        else:
            state = self.full_state_dict()  # collective with bf16 working weights or experts
            if self.rank == 0:
                save_safetensors_atomic(state, path, metadata={"format": "pt", "step": str(self.step)})
        self.barrier()
        return path

    @torch.no_grad()
    def _stream_weights(self, path: Path) -> None:
        """Collective: rank 0 writes ``full_state_dict()``'s tensors one at a time, each fetched when its turn
        comes (its own, an fp32 master broadcast from its owner, an expert stack gathered over its EP group,
        a frozen weight read from the phase's starting file), so one tensor at a time is in flight."""
        from kimivl_model.moe_ep import expert_param_names, gather_full_experts
        from tasks.io.weights import SafetensorsWriter

        live = self.model.state_dict(keep_vars=True)
        experts = expert_param_names(self.model)
        masters: set[int] = set()
        if self._muon is not None:
            masters = {id(self._muon.param_groups[g]["params"][i]) for g, i in self._muon.low_precision}
        entries = []
        for name, t in live.items():
            shape = (t.shape[0] * experts[name].ep, *t.shape[1:]) if name in experts else tuple(t.shape)
            fp32 = id(t) in masters or name in self.frozen_low
            entries.append((name, tuple(shape), torch.float32 if fp32 else t.dtype))
        writer = (
            SafetensorsWriter(path, entries, {"format": "pt", "step": str(self.step)})
            if self.rank == 0
            else None
        )
        try:
            for name, t in live.items():
                value = self._fetch_full(name, t, experts, masters, gather_full_experts)
                if writer is not None:
                    writer.write(name, value)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()

    def _fetch_full(self, name: str, t: torch.Tensor, experts: dict, masters: set[int], gather: Any) -> Any:
        """One tensor of the full fp32 state dict, on rank 0 (None elsewhere); collective where needed."""
        if name in self.frozen_low:
            return self._frozen_file[name] if self.rank == 0 else None
        if id(t) in masters:  # an fp32 master lives on the owner (of its expert-data-parallel group)
            v = self._muon.fetch_master(t)
        else:
            v = t.detach()
        if name in experts:  # the whole stack, gathered over the EP group
            full = gather(self.model, {name: v}, dst=0).get(name)
            return full if self.rank == 0 else None
        return v.to("cpu") if self.rank == 0 else None
