// Greedy generation in a real llama.cpp (node-llama-cpp's prebuilt CPU binary) for tests/use/test_gguf.py.
//   node generate.mjs MODEL.gguf CONTEXT_SIZE NEW_TOKENS PROMPT
// prints one JSON line: the model's training context, the context llama.cpp was given, the prompt's ids and
// the generated ids. Exit 3: no prebuilt llama.cpp runs here (the test skips); an abort inside llama.cpp
// (GGML_ASSERT) kills the process with SIGABRT.
import {getLlama} from "node-llama-cpp";

const [modelPath, contextSize, newTokens, prompt] = process.argv.slice(2);
let llama;
try {
    llama = await getLlama({build: "never", gpu: false, logLevel: "error"});
} catch (error) {
    console.error(`no prebuilt llama.cpp: ${error.message}`);
    process.exit(3);
}
const model = await llama.loadModel({modelPath});
// One thread: on a small shared CPU, llama.cpp's spinning worker threads make each token take ~0.5 s.
const context = await model.createContext({contextSize: Number(contextSize), threads: 1});
const sequence = context.getSequence();
const promptIds = model.tokenize(prompt);
const tokens = [];
for await (const token of sequence.evaluate(promptIds, {temperature: 0})) {
    tokens.push(token);
    if (tokens.length >= Number(newTokens)) break;
}
console.log(JSON.stringify({trainContextSize: model.trainContextSize, contextSize: context.contextSize,
                            prompt: promptIds, tokens}));
await context.dispose();
await model.dispose();
await llama.dispose();
