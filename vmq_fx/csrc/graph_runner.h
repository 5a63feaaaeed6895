// A straight-line graph of dispatcher ops run from C++ (vmq_fx/runtime.py builds the program from an FX graph): each
// node's arguments go on a stack and the op is called boxed through torch's dispatcher, as the Python graph module
// would call it, without the Python interpreter, the OpOverload call and the conversion of every argument and result
// between Python and C++ in between. At batch 1 those cost more per node than many of the nodes' own work
// (README, "Running a lowered graph from C++").
//
// Included by module.cpp alone (it needs pybind11 and torch's Python bindings).
#pragma once

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include "vec.h"

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace vmq_fx {

// Hidden, as every build's (vec.h's VMQ_BUILD_LOCAL), and local to each build's Python module: the avx512, avx2 and
// generic builds load side by side in one process (the tests run all three).
class VMQ_BUILD_LOCAL GraphRunner {
 public:
  // program: one tuple per node, in graph order:
  //   ("op", qualified name, overload name, [argument, ...], register, [register freed after it, ...])
  //   ("getitem", source register, index, None, register, [register freed after it, ...])
  // An argument is ("reg", register), ("const", Python value) or ("list", [argument, ...]); the arguments are the
  // schema's, all of them, in its order. Registers [0, n_inputs) hold the inputs; `outputs` are read at the end.
  GraphRunner(const py::list& program, int64_t n_registers, int64_t n_inputs, std::vector<int64_t> outputs)
      : n_registers_(n_registers), n_inputs_(n_inputs), outputs_(std::move(outputs)) {
    for (const py::handle item : program) {
      const py::tuple node = item.cast<py::tuple>();
      Step step;
      const auto kind = node[0].cast<std::string>();
      if (kind == "getitem") {
        step.getitem = true;
        step.source = node[1].cast<int64_t>();
        step.index = node[2].cast<int64_t>();
      } else {
        TORCH_CHECK_VALUE(kind == "op", "vmq_fx.runtime: unknown step kind '", kind, "'");
        const auto name = node[1].cast<std::string>(), overload = node[2].cast<std::string>();
        const auto handle = c10::Dispatcher::singleton().findSchema({name, overload});
        TORCH_CHECK_VALUE(handle.has_value(), "vmq_fx.runtime: no operator ", name, ".", overload,
                          " in torch's dispatcher");
        step.op = *handle;
        const auto& arguments = step.op->schema().arguments();
        const py::list args = node[3].cast<py::list>();
        TORCH_CHECK_VALUE(args.size() == arguments.size(), "vmq_fx.runtime: ", name, ".", overload, " takes ",
                          arguments.size(), " arguments, the program gives ", args.size());
        for (size_t i = 0; i < arguments.size(); ++i) step.args.push_back(argument(args[i], arguments[i].type()));
        step.returns = step.op->schema().returns().size();
      }
      step.target = node[4].cast<int64_t>();
      step.frees = node[5].cast<std::vector<int64_t>>();
      steps_.push_back(std::move(step));
    }
  }

  // The graph's outputs for `inputs`, without autograd (the lowered ops have no backward).
  std::vector<c10::IValue> run(const std::vector<c10::IValue>& inputs) const {
    TORCH_CHECK_VALUE(static_cast<int64_t>(inputs.size()) == n_inputs_, "vmq_fx.runtime: the graph takes ",
                      n_inputs_, " inputs, got ", inputs.size());
    const at::AutoGradMode no_grad(false);
    std::vector<c10::IValue> regs(n_registers_);
    for (int64_t i = 0; i < n_inputs_; ++i) regs[i] = inputs[i];
    torch::jit::Stack stack;
    for (const Step& step : steps_) {
      if (step.getitem) {
        const c10::IValue& whole = regs[step.source];
        regs[step.target] = whole.isTuple() ? whole.toTupleRef().elements()[step.index]
                                            : whole.toList().get(step.index);
      } else {
        stack.clear();
        for (const Arg& arg : step.args) stack.push_back(value(arg, regs));
        step.op->callBoxed(stack);
        regs[step.target] = step.returns == 1 ? std::move(stack[0]) : c10::ivalue::Tuple::create(std::move(stack));
      }
      for (const int64_t r : step.frees) regs[r] = c10::IValue();
    }
    std::vector<c10::IValue> out;
    out.reserve(outputs_.size());
    for (const int64_t r : outputs_) out.push_back(regs[r]);
    return out;
  }

 private:
  // A register, a constant, or a list built from both (sizes that hold a symbolic batch size, tensor lists).
  struct Arg {
    int64_t reg = -1;
    c10::IValue constant;
    std::vector<Arg> items;
    c10::TypePtr item_type;  // of a list with registers in it
    bool is_list = false;
  };

  struct Step {
    bool getitem = false;
    std::optional<c10::OperatorHandle> op;  // unset for getitem
    std::vector<Arg> args;
    size_t returns = 0;
    int64_t source = -1, index = -1, target = -1;
    std::vector<int64_t> frees;
  };

  static Arg argument(const py::handle spec, const c10::TypePtr& type) {
    const py::tuple t = spec.cast<py::tuple>();
    const auto kind = t[0].cast<std::string>();
    Arg arg;
    if (kind == "reg") {
      arg.reg = t[1].cast<int64_t>();
    } else if (kind == "const") {
      arg.constant = number_as_tensor(t[1], type);
      if (arg.constant.isNone()) arg.constant = torch::jit::toIValue(t[1], type);
    } else {
      TORCH_CHECK_VALUE(kind == "list", "vmq_fx.runtime: unknown argument kind '", kind, "'");
      c10::TypePtr list_type = type;
      if (const auto optional = list_type->cast<c10::OptionalType>()) list_type = optional->getElementType();
      const auto as_list = list_type->cast<c10::ListType>();
      TORCH_CHECK_VALUE(as_list, "vmq_fx.runtime: a list given for an argument of type ", type->str());
      arg.is_list = true;
      arg.item_type = as_list->getElementType();
      for (const py::handle item : t[1].cast<py::list>()) arg.items.push_back(argument(item, arg.item_type));
    }
    return arg;
  }

  // A Python number where the schema takes a tensor (add.Tensor(x, 1)) as torch's Python bindings pass it: a 0-dim
  // tensor marked as a wrapped number, which type promotion ranks below every tensor. None for anything else.
  static c10::IValue number_as_tensor(const py::handle obj, const c10::TypePtr& type) {
    if (type->kind() != c10::TypeKind::TensorType) return {};
    at::Tensor t;
    if (py::isinstance<py::bool_>(obj))
      t = at::scalar_to_tensor(at::Scalar(obj.cast<bool>()));
    else if (py::isinstance<py::int_>(obj))
      t = at::scalar_to_tensor(at::Scalar(obj.cast<int64_t>()));
    else if (py::isinstance<py::float_>(obj))
      t = at::scalar_to_tensor(at::Scalar(obj.cast<double>()));
    else
      return {};
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    return t;
  }

  static c10::IValue value(const Arg& arg, const std::vector<c10::IValue>& regs) {
    if (arg.reg >= 0) return regs[arg.reg];
    if (!arg.is_list) return arg.constant;
    c10::impl::GenericList list(arg.item_type);
    list.reserve(arg.items.size());
    for (const Arg& item : arg.items) list.push_back(value(item, regs));
    return list;
  }

  std::vector<Step> steps_;
  int64_t n_registers_, n_inputs_;
  std::vector<int64_t> outputs_;
};

inline VMQ_BUILD_LOCAL void bind_graph_runner(py::module& m) {
  py::class_<GraphRunner>(m, "GraphRunner", py::module_local())
      .def(py::init<const py::list&, int64_t, int64_t, std::vector<int64_t>>())
      .def("run", [](const GraphRunner& runner, const std::vector<at::Tensor>& inputs) {
        const std::vector<c10::IValue> values(inputs.begin(), inputs.end());
        std::vector<c10::IValue> out;
        {
          py::gil_scoped_release released;
          out = runner.run(values);
        }
        py::list results;
        for (auto& v : out) results.append(torch::jit::toPyObject(std::move(v)));
        return results;
      });
}

}  // namespace vmq_fx
