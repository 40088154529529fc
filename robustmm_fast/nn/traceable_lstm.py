"""TraceableLSTM: nn.LSTM's parameters, initialisation and numbers, in one torch.compile graph.

Dynamo (torch 2.13) breaks the graph wherever an nn.LSTM instance is reached ("Dynamo does not
support RNN, GRU, or LSTM", even for reading its parameters); with torch._dynamo.config.allow_rnn
it traces the call, but inductor then fails on CPU on aten.mkldnn_rnn_layer. This module is not
an nn.RNNBase: in eager mode it calls the same aten op as nn.LSTM (torch.lstm, so cuDNN/oneDNN and
bitwise nn.LSTM's outputs), and while torch.compile traces it, the recurrence written out over
the time axis on the same parameters:

    [i f g o]_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh     (B, 4H), PyTorch's gate order
    c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)                 (B, H)
    h_t = sigmoid(o) tanh(c_t)                                    (B, H)

h_0 = c_0 = 0; the reverse direction runs the same on the time-reversed input with the
`_reverse` parameters; layer k > 0 reads layer k-1's outputs (dropout between layers in
training). The parameter names, their order and their init (U(-1/sqrt(H), 1/sqrt(H)) in that
order) are nn.LSTM's, so state_dicts load both ways and a seed gives the same weights. Under
compile the input projection of all steps is one matmul and the loop is unrolled, so the graph
grows with L (one compile per sequence length). No initial state, no PackedSequence, no
proj_size: what MIM's UPN uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TraceableLSTM(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TraceableLSTM: {name} must be an int >= 1, got {value!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"TraceableLSTM: dropout must be in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first = bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        dirs = 2 if bidirectional else 1
        self._flat_weights_names = []
        for layer in range(num_layers):
            width = input_size if layer == 0 else dirs * hidden_size
            for suffix in ("", "_reverse")[:dirs]:
                shapes = {"weight_ih": (4 * hidden_size, width),
                          "weight_hh": (4 * hidden_size, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(4 * hidden_size,), bias_hh=(4 * hidden_size,))
                for kind, shape in shapes.items():
                    name = f"{kind}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape)))
                    self._flat_weights_names.append(name)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's: every parameter U(-1/sqrt(H), 1/sqrt(H)), in registration order."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, L, D) if batch_first else (L, B, D) -> (output (.., L, .., dirs H), (h_n, c_n)
        each (num_layers dirs, B, H)), as nn.LSTM(x) with no initial state."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"TraceableLSTM: x must be 3-D with last dim {self.input_size}, "
                             f"got shape {tuple(x.shape)}")
        if torch.compiler.is_compiling():
            return self.unrolled(x)
        batch = x.shape[0] if self.batch_first else x.shape[1]
        dirs = 2 if self.bidirectional else 1
        zeros = x.new_zeros(self.num_layers * dirs, batch, self.hidden_size)
        weights = [getattr(self, name) for name in self._flat_weights_names]
        out, h_n, c_n = torch.lstm(x, (zeros, zeros), weights, self.bias, self.num_layers,
                                   self.dropout, self.training, self.bidirectional,
                                   self.batch_first)
        return out, (h_n, c_n)

    def unrolled(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """forward written out over the time axis (what torch.compile traces)."""
        seq = x if self.batch_first else x.transpose(0, 1)                 # (B, L, D)
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout and self.training:
                seq = F.dropout(seq, self.dropout, True)
            outs = []
            for suffix in ("", "_reverse")[:2 if self.bidirectional else 1]:
                out, h, c = self._direction(seq, f"_l{layer}{suffix}", reverse=bool(suffix))
                outs.append(out)
                finals_h.append(h)
                finals_c.append(c)
            seq = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]    # (B, L, dirs H)
        out = seq if self.batch_first else seq.transpose(0, 1)
        return out, (torch.stack(finals_h), torch.stack(finals_c))

    def _direction(self, seq: Tensor, suffix: str, *, reverse: bool):
        """One layer, one direction: seq (B, L, D) -> (out (B, L, H), h_n (B, H), c_n (B, H))."""
        w_hh = getattr(self, "weight_hh" + suffix)                         # (4H, H)
        xw = seq @ getattr(self, "weight_ih" + suffix).t()                 # (B, L, 4H)
        if self.bias:
            xw = xw + (getattr(self, "bias_ih" + suffix) + getattr(self, "bias_hh" + suffix))
        h = seq.new_zeros(seq.shape[0], self.hidden_size)                  # (B, H)
        c = h
        length = seq.shape[1]
        outputs = [h] * length
        for t in (range(length - 1, -1, -1) if reverse else range(length)):
            i, f, g, o = (xw[:, t] + h @ w_hh.t()).chunk(4, dim=-1)        # (B, H) each
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs[t] = h
        return torch.stack(outputs, dim=1), h, c

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
                f"bidirectional={self.bidirectional}")
