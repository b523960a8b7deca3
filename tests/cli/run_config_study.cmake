# Runs `keysel study --config FILE --out DIR` twice on a small study file and checks the outputs: every file
# written, the same bytes of results.csv both times, exact at recall 1, and a report naming every selector.
# Then `keysel tune` on a small workload writes a selector spec.
#   -DKEYSEL=<keysel binary> -DWORK=<scratch directory>
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
file(WRITE ${WORK}/study.json [=[
{
  "workloads": [{"type": "synthetic", "keys": 512, "tokens": 3, "query_heads": 4, "kv_heads": 2, "head_dim": 32, "seed": 4}],
  "selectors": [{"type": "exact"}, {"type": "streaming", "n_sink": 2},
                {"name": "idx", "type": "indexer", "format": ["fp8_e4m3", "int4"]}],
  "k": [16, 64]
}
]=])
foreach(run a b)
  execute_process(COMMAND ${KEYSEL} study --config ${WORK}/study.json --out ${WORK}/${run}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "keysel study --config failed (${rc}): ${err}")
  endif()
  foreach(file results.csv by_row.csv results.json report.html)
    if(NOT EXISTS ${WORK}/${run}/${file})
      message(FATAL_ERROR "keysel study --out did not write ${file}")
    endif()
  endforeach()
endforeach()
if(NOT err MATCHES "\\[8/8\\]")
  message(FATAL_ERROR "expected plain progress lines on stderr (not a terminal), got:\n${err}")
endif()
file(READ ${WORK}/a/results.csv csv_a)
file(READ ${WORK}/b/results.csv csv_b)
if(NOT csv_a STREQUAL csv_b)
  message(FATAL_ERROR "the same study file gave different results.csv bytes")
endif()
string(FIND "${csv_a}" ",exact,16,recall,6,1,1,1,1,1," exact_recall)
string(FIND "${csv_a}" ",exact,64,mass_ratio,6,1,1,1,1,1," exact_mass_ratio)
if(exact_recall EQUAL -1 OR exact_mass_ratio EQUAL -1)
  message(FATAL_ERROR "expected the exact selector at recall 1 in results.csv:\n${csv_a}")
endif()
file(READ ${WORK}/a/report.html html)
foreach(name "exact" "streaming" "idx[format=fp8_e4m3]" "idx[format=int4]")
  string(FIND "${html}" "${name}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "report.html does not name selector ${name}")
  endif()
endforeach()
file(READ ${WORK}/a/results.json json)
string(JSON studies LENGTH "${json}" studies)
string(JSON rows LENGTH "${json}" studies 0 rows)
if(NOT studies EQUAL 1 OR NOT rows EQUAL 8)
  message(FATAL_ERROR "expected 1 study of 8 rows in results.json, got ${studies} and ${rows}")
endif()

# A study file with an unknown key fails and names it.
file(WRITE ${WORK}/bad.json [=[{"workloads": [{"type": "synthetic"}], "selectors": [{"type": "exact"}], "kays": [1]}]=])
execute_process(COMMAND ${KEYSEL} study --config ${WORK}/bad.json --out ${WORK}/bad
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "kays")
  message(FATAL_ERROR "an unknown key should fail naming it (${rc}): ${err}")
endif()

# keysel tune writes the cheapest configuration meeting the target as a selector spec.
execute_process(COMMAND ${KEYSEL} tune --keys 512 --tokens 3 --heads 4 --kv-heads 2 --dim 64 --k 32
                        --target recall:mean>=0.5 --formats fp32,int8,int4 --no-faiss --overfetch "" --out ${WORK}/tuned.json
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "keysel tune failed (${rc}): ${out} ${err}")
endif()
if(NOT out MATCHES "Pareto frontier" OR NOT out MATCHES "cheapest configuration meeting")
  message(FATAL_ERROR "keysel tune should print the frontier and the choice:\n${out}")
endif()
file(READ ${WORK}/tuned.json spec)
string(JSON type GET "${spec}" type)
if(NOT type STREQUAL "indexer")
  message(FATAL_ERROR "expected an indexer spec in tuned.json, got:\n${spec}")
endif()
