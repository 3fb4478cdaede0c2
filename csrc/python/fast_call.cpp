// cnnops._C.call(op, *args): calls a cnnops op from Python without torch.ops' generic argument
// matching. torch.ops converts each argument by trying it against the schema's types (a few
// microseconds per call, as much as a small kernel costs); here every argument's kind is read
// from the schema once (cnnops._C.op(name)) and converted directly. The call then goes through
// the whole dispatcher as any other: autograd, autocast, tracing, vmap rules, dispatch modes.
//
// cnnops.functional takes this path in eager mode and torch.ops' under torch.compile or when an
// argument or mode overrides __torch_function__ (cnnops/_ops.py: fast_call_ok).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <vector>

namespace cnnops::python {
namespace {

enum class ArgKind { kTensor, kOptionalTensor, kIntList, kBoolList, kInt, kBool, kFloat, kString };

struct FastOp {
  c10::OperatorHandle handle;
  std::vector<ArgKind> args;
  size_t returns;
};

std::vector<FastOp>& registry() {
  static std::vector<FastOp> ops;
  return ops;
}

ArgKind kind_of(const c10::Argument& argument, const std::string& op) {
  const auto& type = argument.type();
  if (type->kind() == c10::TypeKind::TensorType) return ArgKind::kTensor;
  if (type->kind() == c10::TypeKind::IntType) return ArgKind::kInt;
  if (type->kind() == c10::TypeKind::BoolType) return ArgKind::kBool;
  if (type->kind() == c10::TypeKind::FloatType) return ArgKind::kFloat;
  if (type->kind() == c10::TypeKind::StringType) return ArgKind::kString;
  if (auto optional = type->cast<c10::OptionalType>();
      optional && optional->getElementType()->kind() == c10::TypeKind::TensorType)
    return ArgKind::kOptionalTensor;
  if (auto list = type->cast<c10::ListType>()) {
    if (list->getElementType()->kind() == c10::TypeKind::IntType) return ArgKind::kIntList;
    if (list->getElementType()->kind() == c10::TypeKind::BoolType) return ArgKind::kBoolList;
  }
  TORCH_CHECK(false, "cnnops._C.op: argument '", argument.name(), "' of ", op, " has type ", type->str(),
              ", which the fast call does not convert");
}

int64_t to_int(PyObject* obj, const char* what) {
  TORCH_CHECK_TYPE(PyLong_Check(obj) && !PyBool_Check(obj), what, ": expected an int, got ", Py_TYPE(obj)->tp_name);
  const long long value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) throw python_error();
  return value;
}

template <typename T, typename Convert>
std::vector<T> to_list(PyObject* obj, const char* what, Convert&& convert) {
  TORCH_CHECK_TYPE(PyTuple_Check(obj) || PyList_Check(obj), what, ": expected a tuple or list, got ",
                   Py_TYPE(obj)->tp_name);
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  std::vector<T> values;
  values.reserve(size);
  for (Py_ssize_t i = 0; i < size; ++i) values.push_back(convert(items[i]));
  return values;
}

c10::IValue to_ivalue(ArgKind kind, PyObject* obj, const char* what) {
  switch (kind) {
    case ArgKind::kTensor:
      TORCH_CHECK_TYPE(THPVariable_Check(obj), what, ": expected a Tensor, got ", Py_TYPE(obj)->tp_name);
      return THPVariable_Unpack(obj);
    case ArgKind::kOptionalTensor:
      if (obj == Py_None) return c10::IValue();
      return to_ivalue(ArgKind::kTensor, obj, what);
    case ArgKind::kIntList:
      return to_list<int64_t>(obj, what, [&](PyObject* item) { return to_int(item, what); });
    case ArgKind::kBoolList: {
      c10::List<bool> values;
      for (const char flag : to_list<char>(obj, what, [&](PyObject* item) {
             TORCH_CHECK_TYPE(PyBool_Check(item), what, ": expected bools, got ", Py_TYPE(item)->tp_name);
             return static_cast<char>(item == Py_True);
           }))
        values.push_back(flag != 0);
      return values;
    }
    case ArgKind::kInt:
      return to_int(obj, what);
    case ArgKind::kBool:
      TORCH_CHECK_TYPE(PyBool_Check(obj), what, ": expected a bool, got ", Py_TYPE(obj)->tp_name);
      return obj == Py_True;
    case ArgKind::kFloat: {
      const double value = PyFloat_AsDouble(obj);
      if (value == -1.0 && PyErr_Occurred()) throw python_error();
      return value;
    }
    case ArgKind::kString: {
      Py_ssize_t size = 0;
      const char* text = PyUnicode_Check(obj) ? PyUnicode_AsUTF8AndSize(obj, &size) : nullptr;
      TORCH_CHECK_TYPE(text != nullptr, what, ": expected a str, got ", Py_TYPE(obj)->tp_name);
      return std::string(text, size);
    }
  }
  return c10::IValue();
}

// op(name) -> int: the handle of cnnops::<name> for call().
PyObject* op(PyObject* /*module*/, PyObject* name) {
  HANDLE_TH_ERRORS
  const char* text = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : nullptr;
  TORCH_CHECK_TYPE(text != nullptr, "cnnops._C.op: expected an op name (str)");
  const std::string qualified = std::string("cnnops::") + text;
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "");
  FastOp entry{handle, {}, handle.schema().returns().size()};
  for (const auto& argument : handle.schema().arguments()) entry.args.push_back(kind_of(argument, qualified));
  registry().push_back(std::move(entry));
  return PyLong_FromSsize_t(static_cast<Py_ssize_t>(registry().size() - 1));
  END_HANDLE_TH_ERRORS
}

// call(op, *args): every argument of the schema, positionally; returns a Tensor or a tuple.
PyObject* call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs >= 1, "cnnops._C.call: expected an op handle");
  const Py_ssize_t index = PyLong_AsSsize_t(args[0]);
  if (index == -1 && PyErr_Occurred()) throw python_error();
  TORCH_CHECK_VALUE(index >= 0 && index < static_cast<Py_ssize_t>(registry().size()),
                    "cnnops._C.call: unknown op handle ", index);
  const FastOp& fast_op = registry()[index];
  const auto& schema = fast_op.handle.schema();
  TORCH_CHECK_TYPE(static_cast<size_t>(nargs - 1) == fast_op.args.size(), schema.name(), ": expected ",
                   fast_op.args.size(), " arguments, got ", nargs - 1);
  torch::jit::Stack stack;
  stack.reserve(fast_op.args.size());
  for (size_t i = 0; i < fast_op.args.size(); ++i)
    stack.push_back(to_ivalue(fast_op.args[i], args[i + 1], schema.arguments()[i].name().c_str()));
  {
    pybind11::gil_scoped_release no_gil;
    fast_op.handle.callBoxed(stack);
  }
  if (fast_op.returns == 1) return THPVariable_Wrap(std::move(stack[0]).toTensor());
  PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(stack.size()));
  if (result == nullptr) throw python_error();
  for (size_t i = 0; i < stack.size(); ++i)
    PyTuple_SET_ITEM(result, static_cast<Py_ssize_t>(i), THPVariable_Wrap(std::move(stack[i]).toTensor()));
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {{"op", op, METH_O, "op(name) -> handle of cnnops::<name> for call()"},
                         {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call)), METH_FASTCALL,
                          "call(handle, *args): the op with every schema argument given positionally"},
                         {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* fast_call_methods() { return methods; }

}  // namespace cnnops::python
