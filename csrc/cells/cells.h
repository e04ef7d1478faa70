// The one list of cells in C++ and CUDA. The CPU op dispatch (with_cell in
// csrc/cpu/sequence.cpp), the trait query the Python registry is checked against
// (torch.ops.fusedrnn.cell_traits) and the nvcc compile check (tests/cuda) all expand it, so a
// new cell is its header plus one line here.
//
// Each cell type has the traits the kernels branch on (never its name):
//   kGates            G: W_ih and W_hh have G*H rows
//   kCellState        it carries a cell state c beside h
//   kReadsH           its pointwise math reads h_prev itself (not only through hg)
//   kSplitHiddenGrad  d(hg) differs from d(xg), so the backward writes both
//   kSaved            values per row and hidden unit the forward saves for the backward
#pragma once
#include "gru.h"
#include "lstm.h"
#include "rnn.h"

// X(name, type): `name` is the cell's key in the Python registry (fusedrnn/cells.py).
#define FUSEDRNN_FOR_EACH_CELL(X) \
  X("lstm", LSTM)                 \
  X("gru", GRU)                   \
  X("rnn_tanh", RNNTanh)          \
  X("rnn_relu", RNNRelu)
