# Runs `keysel study --config FILE --out DIR` on a small study of the shipped tiny model (128 bytes of its
# held-out text) and checks that the table, results.csv, results.json and report.html carry the model's bits
# per byte; then that --workload rejects unknown names and --config beside it.
#   -DKEYSEL=<keysel binary> -DWORK=<scratch directory>
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
file(WRITE ${WORK}/study.json [=[
{
  "workloads": [{"type": "tiny-lm", "tokens": 128, "offset": 256}],
  "selectors": [{"type": "exact"}, {"type": "indexer", "format": "int4"}, {"type": "random", "seed": 2}],
  "k": [16, 64]
}
]=])
execute_process(COMMAND ${KEYSEL} study --config ${WORK}/study.json --out ${WORK}/out
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "keysel study on a tiny-lm workload failed (${rc}): ${err}")
endif()
foreach(word "tiny-lm\\(eval.txt\\[256:384\\]\\)" "full attention [0-9.]+ bits per byte" "bpb_increase" "indexer\\(int4\\)")
  if(NOT out MATCHES "${word}")
    message(FATAL_ERROR "the table lacks '${word}':\n${out}")
  endif()
endforeach()
file(READ ${WORK}/out/results.csv csv)
foreach(line ",exact,16,recall,1536,1,1,1,1,1," ",exact,64,bpb,127," ",random,64,bpb_increase,127,")
  string(FIND "${csv}" "${line}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "results.csv lacks '${line}' (6 layers x 128 tokens x 2 groups rows, 127 predicted bytes):\n${csv}")
  endif()
endforeach()
file(READ ${WORK}/out/results.json json)
string(JSON layers LENGTH "${json}" studies 0 layers)
string(JSON full_bpb GET "${json}" studies 0 full_attention bpb mean)
if(NOT layers EQUAL 6 OR NOT full_bpb GREATER 0)
  message(FATAL_ERROR "expected 6 layers and full attention's bits per byte in results.json, got ${layers}, ${full_bpb}")
endif()
file(READ ${WORK}/out/report.html html)
foreach(part "bits per byte vs recall" "bits per byte vs mass" "Recall by layer and group (head): tiny-lm")
  string(FIND "${html}" "${part}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "report.html lacks '${part}'")
  endif()
endforeach()

# --workload names a built-in study file; anything else, or beside --config, fails naming the option.
execute_process(COMMAND ${KEYSEL} study --workload bogus RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "workload")
  message(FATAL_ERROR "--workload bogus should fail naming the option (${rc}): ${err}")
endif()
execute_process(COMMAND ${KEYSEL} study --workload tiny-lm --config ${WORK}/study.json
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "config")
  message(FATAL_ERROR "--workload with --config should fail (${rc}): ${err}")
endif()
execute_process(COMMAND ${KEYSEL} study --help RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT out MATCHES "--workload tiny-lm")
  message(FATAL_ERROR "keysel study --help should explain --workload tiny-lm:\n${out}")
endif()
