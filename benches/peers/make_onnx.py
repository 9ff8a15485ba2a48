#!/usr/bin/env python3
"""Exports the ONNX models tract runs for the peers benchmark (see README.md).

    python3 make_onnx.py OUT_DIR

writes, with random weights (PyTorch's default initialisation, seed 0) and fixed shapes:

    w1_lstm_fwd.onnx    nn.LSTM(256, 256), input x (512, 32, 256) -> y (512, 32, 256), h_n, c_n
    w3_gru_step.onnx    one step of nn.GRU(64, 128): x (1, 1, 64), h (1, 1, 128) -> y, h_n
    w4_lstm_step.onnx   one step of nn.LSTM(256, 256): x (1, 1, 256), h, c (1, 1, 256) -> y, h_n, c_n
    w6_linear.onnx      nn.Linear(256, 256) on x (32, 512, 256) -> y (32, 512, 256)

Needs torch and onnx (the TorchScript-based exporter, `dynamo=False`, so that the recurrent layers
become ONNX's own LSTM and GRU operators). Do not keep the files in the repository.
"""

import os
import sys
import warnings

import torch
from torch import nn


def export(module, args, path, input_names, output_names):
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            path,
            input_names=input_names,
            output_names=output_names,
            opset_version=17,
            dynamo=False,
        )
    print(f"wrote {path}")


class GruStep(nn.Module):
    def __init__(self, i, h):
        super().__init__()
        self.gru = nn.GRU(i, h)

    def forward(self, x, h):
        return self.gru(x, h)


class LstmStep(nn.Module):
    def __init__(self, i, h):
        super().__init__()
        self.lstm = nn.LSTM(i, h)

    def forward(self, x, h, c):
        y, (hn, cn) = self.lstm(x, (h, c))
        return y, hn, cn


class LstmSeq(nn.Module):
    def __init__(self, i, h):
        super().__init__()
        self.lstm = nn.LSTM(i, h)

    def forward(self, x):
        y, (hn, cn) = self.lstm(x)
        return y, hn, cn


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    with torch.no_grad():
        export(
            LstmSeq(256, 256),
            (torch.randn(512, 32, 256),),
            os.path.join(out, "w1_lstm_fwd.onnx"),
            ["x"],
            ["y", "h_n", "c_n"],
        )
        export(
            GruStep(64, 128),
            (torch.randn(1, 1, 64), torch.zeros(1, 1, 128)),
            os.path.join(out, "w3_gru_step.onnx"),
            ["x", "h"],
            ["y", "h_n"],
        )
        export(
            LstmStep(256, 256),
            (torch.randn(1, 1, 256), torch.zeros(1, 1, 256), torch.zeros(1, 1, 256)),
            os.path.join(out, "w4_lstm_step.onnx"),
            ["x", "h", "c"],
            ["y", "h_n", "c_n"],
        )
        export(
            nn.Linear(256, 256),
            (torch.randn(32, 512, 256),),
            os.path.join(out, "w6_linear.onnx"),
            ["x"],
            ["y"],
        )


if __name__ == "__main__":
    main()
