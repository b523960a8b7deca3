// keysel: everything in one include. Link keysel::keysel.
#pragma once

#include "keysel/core/attention_inputs.h"
#include "keysel/core/build_config.h"
#include "keysel/core/device.h"
#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"
#include "keysel/core/threads.h"
#include "keysel/attention/reference.h"
#include "keysel/indexer/selector.h"
#include "keysel/indexer/topk.h"
#include "keysel/recall/metrics.h"
#include "keysel/recall/study.h"
#include "keysel/recall/synthetic.h"
