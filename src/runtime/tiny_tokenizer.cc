// Trains the tiny tokenizer used by the offline random model and by tests, so neither needs a
// download: a plain BPE trainer (most frequent adjacent pair first) over an embedded corpus,
// producing a SentencePiece-format model with byte fallback. Deterministic by construction.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "collm/runtime/tokenizer.h"
#include "sentencepiece_model.h"

namespace collm::runtime {
namespace {

constexpr int kMinVocabSize = 300;
constexpr int kMaxVocabSize = 4000;
constexpr std::string_view kSpace = "\xE2\x96\x81";

// Original children's-story sentences, one training sentence per line.
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

std::vector<std::string> SplitChars(std::string_view word) {
  std::vector<std::string> out;
  for (size_t i = 0; i < word.size();) {
    const unsigned char c = static_cast<unsigned char>(word[i]);
    size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    len = std::min(len, word.size() - i);
    out.emplace_back(word.substr(i, len));
    i += len;
  }
  return out;
}

bool IsDigit(const std::string& s) { return s.size() == 1 && s[0] >= '0' && s[0] <= '9'; }

}  // namespace

absl::Status TrainTinyTokenizer(const std::string& path, int vocab_size) {
  if (vocab_size < kMinVocabSize || vocab_size > kMaxVocabSize) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer vocab_size must be in [",
                                                   kMinVocabSize, ", ", kMaxVocabSize, "], got ",
                                                   vocab_size));
  }
  // Words as SentencePiece sees them: spaces become "\u2581", which starts each word.
  std::map<std::string, int64_t> word_counts;
  std::map<std::string, int64_t> char_counts;
  size_t pos = 0;
  while (pos < kCorpus.size()) {
    size_t end = kCorpus.find('\n', pos);
    if (end == std::string_view::npos) end = kCorpus.size();
    std::string_view line = kCorpus.substr(pos, end - pos);
    pos = end + 1;
    size_t w = 0;
    while (w < line.size()) {
      while (w < line.size() && line[w] == ' ') ++w;
      size_t e = line.find(' ', w);
      if (e == std::string_view::npos) e = line.size();
      if (e > w) word_counts[std::string(kSpace) + std::string(line.substr(w, e - w))]++;
      w = e;
    }
  }
  std::vector<std::pair<std::vector<std::string>, int64_t>> words;
  for (const auto& [word, count] : word_counts) {
    words.push_back({SplitChars(word), count});
    for (const auto& ch : words.back().first) char_counts[ch] += count;
  }
  // Layout: <unk> <s> </s>, 256 byte pieces, merges (best first), then single characters.
  const int budget = vocab_size - 259;
  std::vector<std::string> chars;
  for (const auto& [ch, count] : char_counts) chars.push_back(ch);
  // Rarest characters are left to byte fallback when the vocabulary is too small for all.
  std::stable_sort(chars.begin(), chars.end(), [&](const std::string& a, const std::string& b) {
    return char_counts[a] > char_counts[b];
  });
  const int num_chars = std::min<int>(chars.size(), budget / 2);
  chars.resize(num_chars);
  const std::set<std::string> kept(chars.begin(), chars.end());
  // Words containing a dropped character cannot be merged through it.
  std::vector<std::string> merges;
  std::set<std::string> known(chars.begin(), chars.end());
  while (static_cast<int>(merges.size()) < budget - num_chars) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;
    for (const auto& [syms, count] : words) {
      for (size_t i = 0; i + 1 < syms.size(); ++i) {
        if (IsDigit(syms[i]) || IsDigit(syms[i + 1])) continue;  // split_digits
        if (!known.count(syms[i]) || !known.count(syms[i + 1])) continue;
        if (syms[i + 1].compare(0, kSpace.size(), kSpace) == 0) continue;  // Never across words.
        pairs[{syms[i], syms[i + 1]}] += count;
      }
    }
    if (pairs.empty()) break;
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it) {
      if (it->second > best->second) best = it;  // Ties: the first in map order (deterministic).
    }
    const std::string merged = best->first.first + best->first.second;
    for (auto& [syms, count] : words) {
      std::vector<std::string> out;
      for (size_t i = 0; i < syms.size(); ++i) {
        if (i + 1 < syms.size() && syms[i] == best->first.first &&
            syms[i + 1] == best->first.second) {
          out.push_back(merged);
          ++i;
        } else {
          out.push_back(syms[i]);
        }
      }
      syms = std::move(out);
    }
    if (known.insert(merged).second) merges.push_back(merged);
  }

  spm::ModelProto model;
  model.model_type = 2;
  model.byte_fallback = true;
  model.normalizer_name = "identity";
  model.add_dummy_prefix = true;
  model.remove_extra_whitespaces = false;  // Decoding gives back exactly what was encoded.
  model.escape_whitespaces = true;
  model.pieces.push_back({"<unk>", 0, spm::PieceType::kUnknown});
  model.pieces.push_back({"<s>", 0, spm::PieceType::kControl});
  model.pieces.push_back({"</s>", 0, spm::PieceType::kControl});
  for (int b = 0; b < 256; ++b) {
    model.pieces.push_back({absl::StrFormat("<0x%02X>", b), 0, spm::PieceType::kByte});
  }
  float score = 0;
  for (const auto& m : merges) model.pieces.push_back({m, score--, spm::PieceType::kNormal});
  for (const auto& c : chars) model.pieces.push_back({c, score--, spm::PieceType::kNormal});
  // A corpus too small for the requested size is padded with unused pieces, so the piece count
  // always equals vocab_size (the model's embedding table is sized by it).
  for (int i = 0; static_cast<int>(model.pieces.size()) < vocab_size; ++i) {
    model.pieces.push_back({absl::StrCat("<unused", i, ">"), score--, spm::PieceType::kUnused});
  }

  const std::string bytes = spm::SerializeModelProto(model);
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) {
      std::remove(tmp.c_str());
      return absl::InternalError(absl::StrCat("cannot write tokenizer ", path));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat("cannot write tokenizer ", path));
  }
  return absl::OkStatus();
}

}  // namespace collm::runtime
