// Trains the tiny tokenizer used by the offline random model and by tests, so neither needs a
// download. The corpus is embedded and training is single-threaded, so the output is byte-for-byte
// reproducible.
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "collm/runtime/tokenizer.h"
#include "sentencepiece_shim.h"  // Private to src/runtime.

namespace collm::runtime {
namespace {

constexpr int kMinVocabSize = 300;
constexpr int kMaxVocabSize = 2000;

// Original children's-story sentences, one training sentence per line. Rich enough in distinct
// words to yield ~1700 BPE merges above the 259 byte/control pieces.
constexpr std::string_view kCorpus = R"corpus(
Once upon a time, in a small village by the sea, there lived a girl named Mira.
Mira had a red kite, 2 brown boots and a little dog called Pepper.
Every morning she ran to the harbor to count the boats: 1, 2, 3, 4, 5!
One day the wind was very strong, and her kite flew over the lighthouse.
"Come back!" shouted Mira, but the kite only danced higher in the sky.
Pepper barked and chased its shadow across the wet sand.
An old fisherman named Tobias laughed and said, "Kites always return to brave friends."
Mira climbed the rocky path, holding her hat so it would not blow away.
At the top she found the kite tangled in a thorny bush full of purple berries.
She pulled gently, whispered "thank you" to the bush, and the string came free.
When she got home, her mother made warm soup with carrots, beans and 7 potatoes.
They ate together while the rain tapped softly on the kitchen window.
Later that week, Mira's cousin Leo visited from the city with a yellow suitcase.
Leo had never seen a starfish, so they walked to the tide pools at noon.
"Look, it has 5 arms!" Leo said, his eyes wide with wonder.
A crab scuttled sideways and hid beneath a smooth green stone.
They collected shells: a spiral one, a striped one and 12 tiny white ones.
In the evening they built a sandcastle with towers, bridges and a deep moat.
The waves crept closer and closer until the castle slowly melted away.
Leo felt sad, but Mira smiled and said, "Tomorrow we can build a bigger one."
On Saturday the whole village gathered for the summer festival.
There were lanterns, music, juggling clowns and a parade of painted wagons.
A baker sold cinnamon buns for 3 coins each, and Mira bought 4.
Grandpa Oliver played the fiddle while children twirled around the fountain.
Suddenly, a goat escaped from the farm and ran straight through the market!
It knocked over a basket of apples and nibbled a lady's flowery bonnet.
Everyone giggled as the farmer chased the goat past the bakery and the school.
Finally Pepper herded the goat back into its pen, wagging his tail proudly.
The mayor gave Pepper a shiny medal that said "Hero of 1999" by mistake.
Nobody minded, because the night sky was full of fireworks and happy songs.
In a quiet forest far away, a sleepy bear named Bruno woke up from winter.
He stretched, yawned and sniffed the fresh air that smelled of pine and honey.
His tummy rumbled loudly, so he went looking for something sweet to eat.
A clever squirrel named Hazel offered him 6 acorns, but Bruno wanted honey.
"The bees live near the waterfall," Hazel said, pointing with her fluffy tail.
Bruno walked carefully along the muddy riverbank, trying not to slip.
He met a shy turtle who was learning to swim faster than the fish.
"Practice every day, and you will improve," Bruno told the turtle kindly.
At the waterfall, the bees buzzed angrily because a branch had broken their hive.
Bruno lifted the heavy branch and set the hive safely in a hollow tree.
The queen bee thanked him and shared a golden jar of delicious honey.
Bruno licked his paws, hummed a cheerful tune and shared the honey with Hazel.
Meanwhile, in a busy town, a boy named Sam dreamed of becoming an astronaut.
He built a rocket from cardboard boxes, tape, bottle caps and aluminum foil.
His sister Ruby painted stars on it and wrote "SPACESHIP 8" on the side.
They counted down together: 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, blast off!
Of course the rocket stayed in the garden, but their imagination soared.
They pretended to visit the moon, Mars and a planet made entirely of cheese.
Sam described craters, glowing comets and friendly aliens with purple antennas.
Ruby insisted that the aliens loved pancakes, jelly and chocolate milk.
At dinner, Dad asked, "How was your journey through the galaxy?"
"Amazing," said Sam, "but next time we need more snacks and a bigger window."
The following winter, snow covered the hills like a thick white blanket.
The children wore mittens, scarves and woolly hats to go sledding.
Ruby's sled was fast, but Sam's was faster because he waxed the bottom.
They raced down the slope, shrieking with joy, and tumbled into a snowdrift.
Afterwards they drank hot cocoa with marshmallows beside the crackling fireplace.
Grandma knitted socks and told stories about dragons, giants and clever foxes.
In one story, a fox tricked a greedy wolf into crossing a frozen pond.
The ice cracked, the wolf splashed into the chilly water and learned his lesson.
"Be honest and generous," Grandma said, "and good luck will follow you."
Each spring, the garden behind the cottage burst into color again.
Tulips, daisies, sunflowers and roses grew in neat rows near the fence.
A hungry caterpillar munched on cabbage leaves until it was round and plump.
Then it spun a silky cocoon and slept quietly for 14 days.
When it woke up, it had become a beautiful butterfly with orange wings.
The butterfly fluttered over the meadow, visiting every blossom it could find.
A family of ducks waddled to the pond, quacking in a long, noisy line.
The smallest duckling was afraid of the water and stayed on the bank.
Her brothers splashed and paddled, calling, "Jump in, it's wonderful!"
At last she took a deep breath, closed her eyes and hopped into the pond.
She floated! She kicked her feet and discovered that swimming was easy.
From then on, she was the first to dive in every single morning.
Far in the north, a lonely penguin named Pip wanted to see a rainbow.
He asked a wise walrus, who said rainbows appear when sunlight meets rain.
Pip waited and waited, watching the grey clouds drift over the icy ocean.
On the 30th day, the clouds opened, warm sunshine broke through, and it drizzled.
A magnificent rainbow stretched across the sky in red, orange, yellow, green, blue and violet.
Pip clapped his flippers and invited all his friends to admire it together.
A curious robot named Bolt lived in a workshop full of gears and springs.
Bolt could sweep floors, water plants and even bake muffins, but he could not whistle.
Every evening he practiced, but only beeps and squeaks came out.
The inventor, Professor Quill, adjusted a tiny valve with her screwdriver.
The next morning Bolt whistled a perfect melody, and the canary whistled back.
They became best friends and performed duets for the neighbors on Sundays.
Remember: kindness, patience and curiosity can turn an ordinary day into an adventure.
The end. Questions? Ask: who, what, where, when, why and how; then count 0 to 9.
)corpus";

// Feeds kCorpus to the trainer line by line.
class CorpusIterator : public sentencepiece::SentenceIterator {
 public:
  CorpusIterator() { Next(); }
  bool done() const override { return done_; }
  void Next() override {
    while (pos_ < kCorpus.size()) {
      size_t end = kCorpus.find('\n', pos_);
      if (end == std::string_view::npos) end = kCorpus.size();
      std::string_view line = kCorpus.substr(pos_, end - pos_);
      pos_ = end + 1;
      if (!line.empty()) {
        value_.assign(line.data(), line.size());
        return;
      }
    }
    done_ = true;
  }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }

 private:
  size_t pos_ = 0;
  std::string value_;
  bool done_ = false;
};

absl::Status WriteFileAtomically(const std::string& path, const std::string& contents) {
  // A reader (another test, the model builder) never sees a half-written model.
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot create ", tmp, ": ", std::strerror(errno)));
    }
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      return absl::DataLossError(absl::StrCat("cannot write ", tmp));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::PermissionDeniedError(
        absl::StrCat("cannot rename ", tmp, " to ", path, ": ", std::strerror(err)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status TrainTinyTokenizer(const std::string& path, int vocab_size) {
  if (vocab_size < kMinVocabSize || vocab_size > kMaxVocabSize) {
    return absl::InvalidArgumentError(absl::StrCat("tiny tokenizer vocab_size must be in [",
                                                   kMinVocabSize, ", ", kMaxVocabSize, "], got ",
                                                   vocab_size));
  }
  std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      // Identity + kept whitespace make decoding lossless, like the Llama tokenizer.
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "true"},
      {"num_threads", "1"},  // Deterministic output.
      {"minloglevel", "2"},  // The trainer logs every merge at INFO.
  };
  // Every distinct corpus character needs a piece of its own, which the smallest vocabularies
  // cannot afford next to the 259 byte/control pieces. Those drop the rarest characters (they
  // still round-trip through byte fallback); the sequence is fixed, so output stays deterministic.
  static constexpr const char* kCoverages[] = {"1.0", "0.999", "0.995", "0.99", "0.98",
                                               "0.97", "0.95", "0.9"};
  std::string serialized;
  sentencepiece::util::Status status;
  for (const char* coverage : kCoverages) {
    args["character_coverage"] = coverage;
    CorpusIterator corpus;
    serialized.clear();
    status = sentencepiece::SentencePieceTrainer::Train(args, &corpus, &serialized);
    if (status.ok() || !absl::StrContains(status.message(), "required_chars")) break;
  }
  if (!status.ok()) {
    return absl::InternalError(absl::StrCat("training tiny tokenizer for ", path,
                                            " (vocab_size ", vocab_size,
                                            ") failed: ", status.message()));
  }
  return WriteFileAtomically(path, serialized);
}

}  // namespace collm::runtime
