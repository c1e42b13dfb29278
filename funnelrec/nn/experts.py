"""Mixture-of-experts layers for multi-task ranking: MMoE and PLE (CGC) extraction layers.

* **MMoE** (Ma et al., *Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts*,
  KDD'18): E experts read the same input; each of G gates mixes all experts with its own softmax weights.
* **PLE** (Tang et al., *Progressive Layered Extraction*, RecSys'20): each task owns ``task_experts`` experts and
  ``shared_experts`` experts are common; in a CGC/extraction layer, task t's gate mixes its own experts and the shared
  ones, and (below the last level) a shared gate mixes all experts to feed the next level's shared experts. At levels
  after the first, task t's experts and gate read task t's output of the level below, the shared experts and gate
  read the shared output.

All experts of a layer run as one batched matmul per MLP layer (``GroupedMLP``), never a Python loop over experts.

Example:
    >>> import torch
    >>> mmoe = MMoELayer(in_dim=12, num_experts=4, expert_dims=[8], num_gates=3)
    >>> mmoe(torch.randn(2, 5, 12)).shape                  # [..., G, H]
    torch.Size([2, 5, 3, 8])
    >>> cgc = ExtractionLayer(12, num_tasks=3, task_experts=1, shared_experts=2, expert_dims=[8], shared_out=True)
    >>> h = cgc(torch.randn(2, 5, 12))                   # first level: everyone reads the input
    >>> h.shape                                           # [..., T + 1, H]: T task outputs, then the shared one
    torch.Size([2, 5, 4, 8])
    >>> ExtractionLayer(8, 3, 1, 2, [8], shared_out=False)(h, grouped=True).shape
    torch.Size([2, 5, 3, 8])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError
from funnelrec.nn.embedding import take


class GroupedLinear(nn.Module):
    """G independent linear maps in one batched matmul.

    Args:
        groups: G.
        in_dim: input width of every group.
        out_dim: output width of every group.

    ``forward(x)`` takes x [..., in_dim] (every group reads the same input) or, with ``grouped=True``,
    x [..., G, in_dim] (group g reads x[..., g, :]); it returns [..., G, out_dim].

    Example:
        >>> import torch
        >>> lin = GroupedLinear(3, 4, 2)
        >>> lin(torch.randn(5, 4)).shape, lin(torch.randn(5, 3, 4), grouped=True).shape
        (torch.Size([5, 3, 2]), torch.Size([5, 3, 2]))
    """

    def __init__(self, groups: int, in_dim: int, out_dim: int):
        super().__init__()
        if groups < 1 or in_dim < 1 or out_dim < 1:
            raise ConfigError(f"GroupedLinear needs positive sizes, got groups={groups} in={in_dim} out={out_dim}")
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialisation, per group
        self.weight = nn.Parameter(torch.empty(groups, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, out_dim).uniform_(-bound, bound))

    @property
    def groups(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: Tensor, grouped: bool = False) -> Tensor:
        """x [..., in] (or [..., G, in] with ``grouped``) → [..., G, out]."""
        if grouped:
            if x.dim() < 2 or x.shape[-2] != self.groups:
                raise ConfigError(f"grouped input must be [..., {self.groups}, in], got {list(x.shape)}")
            return torch.einsum("...gi,gio->...go", x, self.weight) + self.bias
        return torch.einsum("...i,gio->...go", x, self.weight) + self.bias


class GroupedMLP(nn.Module):
    """G independent MLPs (experts), each layer one ``GroupedLinear``, activated after every layer.

    Args:
        groups: G experts.
        in_dim: input width.
        dims: widths of every layer; the last is the expert output width H.
        activation: module class of the activation.

    Example:
        >>> import torch
        >>> GroupedMLP(4, 10, [16, 8])(torch.randn(3, 10)).shape   # [..., G, H]
        torch.Size([3, 4, 8])
    """

    def __init__(self, groups: int, in_dim: int, dims: Sequence[int], activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        if not dims:
            raise ConfigError("GroupedMLP needs at least one layer width")
        widths = [in_dim, *dims]
        self.layers = nn.ModuleList(GroupedLinear(groups, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = activation()

    @property
    def out_dim(self) -> int:
        return int(self.layers[-1].weight.shape[-1])

    def forward(self, x: Tensor, grouped: bool = False) -> Tensor:
        """x [..., in] (or [..., G, in] with ``grouped``) → [..., G, H]."""
        h = self.act(self.layers[0](x, grouped=grouped))
        for layer in self.layers[1:]:
            h = self.act(layer(h, grouped=True))
        return h


class MMoELayer(nn.Module):
    """Multi-gate mixture of experts: E shared experts, G softmax gates, one mixture per gate.

    Args:
        in_dim: input width.
        num_experts: E.
        expert_dims: widths of each expert MLP (output width H = ``expert_dims[-1]``).
        num_gates: G (one per task tower).
        activation: module class of the expert activations.

    Example:
        >>> import torch
        >>> layer = MMoELayer(6, num_experts=3, expert_dims=[4], num_gates=2)
        >>> layer(torch.randn(5, 6)).shape, layer.gate_weights(torch.randn(5, 6)).shape
        (torch.Size([5, 2, 4]), torch.Size([5, 2, 3]))
    """

    def __init__(self, in_dim: int, num_experts: int, expert_dims: Sequence[int], num_gates: int,
                 activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.experts = GroupedMLP(num_experts, in_dim, expert_dims, activation)
        self.gates = nn.Linear(in_dim, num_gates * num_experts)
        self.num_gates, self.num_experts = num_gates, num_experts

    @property
    def out_dim(self) -> int:
        return self.experts.out_dim

    def gate_weights(self, x: Tensor) -> Tensor:
        """[..., G, E] softmax weights of every gate."""
        return self.gates(x).unflatten(-1, (self.num_gates, self.num_experts)).softmax(-1)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] → [..., G, H]: gate g's mixture of the E expert outputs."""
        return self.gate_weights(x) @ self.experts(x)  # [..., G, E] @ [..., E, H]


class ExtractionLayer(nn.Module):
    """One PLE extraction layer (a CGC block): task-specific and shared experts, task gates and a shared gate.

    Experts are ordered task 0's ``task_experts``, task 1's, …, then the ``shared_experts``.

    Args:
        in_dim: width of the layer input.
        num_tasks: T, the task towers this layer feeds.
        task_experts: experts owned by each task.
        shared_experts: experts shared by all tasks.
        expert_dims: widths of each expert MLP (output width H).
        shared_out: also output the shared gate's mixture of all experts (every level but the last).
        activation: module class of the expert activations.

    ``forward(x)`` takes x [..., in] at the first level (every expert and gate reads it) or, with ``grouped=True``,
    x [..., T + 1, in] (the previous level's T task outputs then its shared output); it returns [..., T + 1, H]
    when ``shared_out`` else [..., T, H].

    Example:
        >>> import torch
        >>> layer = ExtractionLayer(6, num_tasks=2, task_experts=2, shared_experts=1, expert_dims=[4],
        ...                         shared_out=False)
        >>> layer(torch.randn(5, 6)).shape
        torch.Size([5, 2, 4])
    """

    def __init__(self, in_dim: int, num_tasks: int, task_experts: int, shared_experts: int,
                 expert_dims: Sequence[int], shared_out: bool, activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        if num_tasks < 1 or task_experts < 0 or shared_experts < 0 or task_experts + shared_experts < 1:
            raise ConfigError(f"ExtractionLayer needs num_tasks >= 1 and at least one expert per gate, got "
                              f"num_tasks={num_tasks} task_experts={task_experts} shared_experts={shared_experts}")
        t, et, es = num_tasks, task_experts, shared_experts
        self.num_tasks, self.task_experts, self.shared_experts, self.shared_out = t, et, es, shared_out
        self.experts = GroupedMLP(t * et + es, in_dim, expert_dims, activation)
        # which input slot each expert reads (grouped input), and which experts each task gate mixes
        owner = torch.cat([torch.arange(t).repeat_interleave(et), torch.full((es,), t)])
        select = torch.cat([torch.arange(t * et).view(t, et), torch.arange(t * et, t * et + es).expand(t, es)], 1)
        self.register_buffer("owner", owner, persistent=False)  # [E]
        self.register_buffer("select", select, persistent=False)  # [T, Et + Es]
        self.task_gates = GroupedLinear(t, in_dim, et + es)
        self.shared_gate = nn.Linear(in_dim, t * et + es) if shared_out else None

    @property
    def num_experts(self) -> int:
        return self.experts.layers[0].groups

    @property
    def out_dim(self) -> int:
        return self.experts.out_dim

    def forward(self, x: Tensor, grouped: bool = False) -> Tensor:
        """x [..., in] (or [..., T + 1, in] with ``grouped``) → [..., T (+ 1), H]."""
        t = self.num_tasks
        if grouped:
            experts = self.experts(x.index_select(-2, self.owner), grouped=True)  # [..., E, H]
            task_in, shared_in = x[..., :t, :], x[..., t, :]
            task_w = self.task_gates(task_in, grouped=True).softmax(-1)  # [..., T, K]
        else:
            experts = self.experts(x)
            shared_in = x
            task_w = self.task_gates(x).softmax(-1)
        chosen = take(experts, -2, self.select)  # [..., T, K, H]; not experts[..., select, :] (see take)
        out = (task_w.unsqueeze(-2) @ chosen).squeeze(-2)  # [..., T, H]
        if self.shared_gate is None:
            return out
        shared_w = self.shared_gate(shared_in).softmax(-1).unsqueeze(-2)  # [..., 1, E]
        return torch.cat([out, shared_w @ experts], -2)
