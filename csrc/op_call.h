#pragma once
// Calls of cnnops ops through the whole dispatcher, for kernels that call other ops (autograd,
// autocast): unlike a direct call of a CPU function, each call passes autograd, autocast and
// tracing again.
#include <ATen/core/dispatch/Dispatcher.h>

#include <utility>

// CNNOPS_OP_CALL(conv_forward, Tensor(const Tensor&, ...)) defines call::conv_forward(...): the op
// through the whole dispatcher (autograd included, unlike a direct call of a CPU function), its
// handle looked up once.
#define CNNOPS_OP_CALL(name, ...)                                                                  \
  namespace call {                                                                                 \
  template <typename... Args>                                                                      \
  inline decltype(auto) name(Args&&... args) {                                                     \
    static const auto handle =                                                                     \
        c10::Dispatcher::singleton().findSchemaOrThrow("cnnops::" #name, "").typed<__VA_ARGS__>(); \
    return handle.call(std::forward<Args>(args)...);                                               \
  }                                                                                                \
  }
