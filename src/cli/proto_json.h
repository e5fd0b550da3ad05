// The one JSON rendering of a proto message for collmctl's --json output (device and fed verbs):
// pretty-printed, proto field names, fields at their default value included so scripts can rely on
// every key being present.
#pragma once

#include <google/protobuf/message.h>
#include <google/protobuf/util/json_util.h>

#include <string>

namespace collm::cli {

inline std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

}  // namespace collm::cli
