// keysel: everything in one include. Link keysel::keysel.
//
// The CUDA entry points (keysel/indexer/cuda_*.h, keysel/attention/cuda_*.h) are declared in every build and
// throw keysel::Error in a build without CUDA; include them where you use them.
#pragma once

#include "keysel/core/attention_inputs.h"
#include "keysel/core/build_config.h"
#include "keysel/core/checked.h"
#include "keysel/core/device.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/files.h"
#include "keysel/core/memory.h"
#include "keysel/core/random.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"
#include "keysel/core/threads.h"

#include "keysel/attention/reference.h"
#include "keysel/attention/sparse_attention.h"

#include "keysel/indexer/candidate_search.h"
#include "keysel/indexer/faiss_search.h"
#include "keysel/indexer/fast_topk.h"
#include "keysel/indexer/hadamard.h"
#include "keysel/indexer/key_cache.h"
#include "keysel/indexer/lightning_indexer.h"
#include "keysel/indexer/proxy_scorer.h"
#include "keysel/indexer/quantization.h"
#include "keysel/indexer/selector.h"
#include "keysel/indexer/selectors.h"
#include "keysel/indexer/simd.h"
#include "keysel/indexer/topk.h"

#include "keysel/recall/metrics.h"
#include "keysel/recall/study.h"
#include "keysel/recall/synthetic.h"
