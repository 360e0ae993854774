// The slice of ATen the kernel files need. Only bindings.cpp includes torch/extension.h (pybind11
// and the whole C++ frontend): every file that includes it takes several times as long to compile,
// and the kernels are compiled on each machine's first use (`make test` on a clean clone pays it).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <optional>
