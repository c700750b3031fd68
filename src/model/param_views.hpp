// Named pointers to every parameter tensor of the GPT (or to its gradient), into a buffer laid out
// by gpt_param_layout: the CPU and CUDA engines walk the model through the same views.
#pragma once

#include <cstddef>
#include <vector>

#include "model/gpt.hpp"

namespace nibble::model {

template <class T>
struct ParamViews {
  struct Layer {
    T *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b, *fcw, *fcb, *fcprojw, *fcprojb;
  };
  T *wte, *wpe, *lnfw, *lnfb;
  std::vector<Layer> layers;

  ParamViews(const GptConfig& c, const std::vector<ParamTensor>& layout, T* base) {
    std::size_t i = 0;
    auto next = [&] { return base + layout[i++].offset; };
    // Without biases the layout has no `.bias` tensors: their views are null (ops take null as none).
    auto bias = [&]() -> T* { return c.bias ? next() : nullptr; };
    wte = next();
    wpe = next();
    layers.resize(static_cast<std::size_t>(c.layers));
    for (Layer& l : layers) {
      l.ln1w = next(), l.ln1b = bias(), l.qkvw = next(), l.qkvb = bias(), l.attprojw = next(), l.attprojb = bias();
      l.ln2w = next(), l.ln2b = bias(), l.fcw = next(), l.fcb = bias(), l.fcprojw = next(), l.fcprojb = bias();
    }
    lnfw = next();
    lnfb = bias();
  }
};

}  // namespace nibble::model
