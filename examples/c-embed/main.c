/*
 * Fine-tunes all-MiniLM-L6-v2 with the LoRA plugin on a few hundred Amazon review sentences
 * (UCI Sentiment Labelled Sentences) through Whetstone's C ABI: progress from a callback,
 * evaluation, the PEFT adapter saved and loaded back, sentence embeddings, a second run
 * cancelled from its callback and continued, and misuse answered with errors.
 *
 * Needs the assets and the LoRA plugin:   whet assets fetch && whet plugin build plugins/lora
 * Usage: ./fine_tune OUTPUT_DIR [--quick]
 * Exit status 0 when every check passed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "whetstone.h"

/* Held-out accuracy the full run must reach (the untrained head is at chance, about 0.5). */
#define MIN_ACCURACY 0.75

static const char *RECIPE =
    "[model]\n"
    "path = \"asset:all-minilm-l6-v2\"\n"
    "task = \"classification\"\n"
    "[data]\n"
    "train = [\"asset:uci-sentiment/amazon.json\"]\n"
    "text_field = \"text\"\n"
    "label_field = \"class\"\n"
    "skip_bad_records = true\n"
    "max_records = %d\n"
    "validation_ratio = 0.2\n"
    "max_seq_len = %d\n"
    "[method]\n"
    "kind = \"lora\"\n"
    "r = 8\n"
    "lora_alpha = 16\n"
    "target_modules = [\"query\", \"value\"]\n"
    "modules_to_save = [\"classifier\"]\n"
    "[training]\n"
    "learning_rate = 3e-3\n"
    "epochs = %d\n"
    "batch_size = %d\n"
    "warmup_ratio = 0.1\n"
    "seed = 42\n"
    "[output]\n"
    "dir = \"%s/first\"\n";

/* Reports a failed call and frees its error. */
static int failed(const char *what, WhetStatus status, WhetError *err) {
    const char *message = *err ? whet_error_message(*err) : NULL;
    fprintf(stderr, "%s: %s: %s\n", what, whet_status_name(status),
            message ? message : "(no message)");
    whet_error_free(*err);
    *err = 0;
    return 1;
}

#define CHECK(what, call)                                                                      \
    do {                                                                                       \
        WhetStatus status_ = (call);                                                           \
        if (status_ != WHET_STATUS_OK) {                                                       \
            failed(what, status_, &err);                                                       \
            goto fail;                                                                         \
        }                                                                                      \
    } while (0)

#define EXPECT(condition, ...)                                                                 \
    do {                                                                                       \
        if (!(condition)) {                                                                    \
            fprintf(stderr, "check failed: " __VA_ARGS__);                                     \
            fputc('\n', stderr);                                                               \
            goto fail;                                                                         \
        }                                                                                      \
    } while (0)

/* What the progress callback needs: the step to cancel at (0: never). */
struct progress_state {
    uint64_t cancel_at;
    uint64_t calls;
};

static int32_t on_progress(const WhetProgress *p, void *user_data) {
    struct progress_state *state = user_data;
    state->calls++;
    printf("  step %3llu/%llu  loss %.4f  lr %.2e  %.0f tokens/s\n",
           (unsigned long long)p->step, (unsigned long long)p->total_steps, p->loss,
           p->learning_rate, p->tokens_per_second);
    fflush(stdout);
    return state->cancel_at != 0 && p->step >= state->cancel_at;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && st.st_size > 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUTPUT_DIR [--quick]\n", argv[0]);
        return 2;
    }
    const char *out = argv[1];
    int quick = argc > 2 && strcmp(argv[2], "--quick") == 0;
    WhetSession session = 0;
    WhetError err = 0;
    char recipe[4096], path[4096], config[4096];

    printf("whetstone %s (C ABI %u, plugin contract %s)\n", whet_version(), whet_abi_version(),
           whet_contract_version());
    EXPECT(whet_abi_version() == WHETSTONE_ABI_VERSION, "header and library ABI differ");
    CHECK("log", whet_log_init("warn", &err));

    /* 1. A session from a recipe: the model loads and LoRA attaches. */
    /* --quick (for valgrind, which runs the model about 50 times slower): 32 records of at most
     * 24 tokens, one epoch of batches of 8. */
    snprintf(recipe, sizeof recipe, RECIPE, quick ? 32 : 400, quick ? 24 : 64, quick ? 1 : 3,
             quick ? 8 : 16, out);
    CHECK("create session", whet_session_create(WHETSTONE_ABI_VERSION, recipe, &session, &err));

    /* 2. Train to the end, hearing every step. */
    struct progress_state state = {0, 0};
    WhetTrainReport report;
    printf("training (LoRA r=8 on query/value):\n");
    CHECK("train", whet_session_train(session, quick ? 2 : 0, on_progress, &state, &report, &err));
    printf("trained %llu of %llu steps, %.3f s/step\n", (unsigned long long)report.step,
           (unsigned long long)report.total_steps, report.seconds_per_step);
    EXPECT(state.calls == report.step, "the callback heard %llu steps, the run took %llu",
           (unsigned long long)state.calls, (unsigned long long)report.step);

    /* 3. Evaluate on the held-out 20 %. */
    WhetEvalReport eval;
    CHECK("evaluate", whet_session_evaluate(session, &eval, &err));
    printf("held-out accuracy %.4f (loss %.4f, %llu examples)\n", eval.accuracy, eval.loss,
           (unsigned long long)eval.examples);
    if (!quick) {
        EXPECT(report.finished == 1, "the run did not finish");
        EXPECT(eval.accuracy >= MIN_ACCURACY, "accuracy %.4f is below %.2f", eval.accuracy,
               MIN_ACCURACY);
    }

    /* 4. Save the PEFT adapter, load it back under another name: same accuracy. */
    snprintf(path, sizeof path, "%s/adapter", out);
    CHECK("save adapter", whet_session_save_adapter(session, path, &err));
    snprintf(path, sizeof path, "%s/adapter/adapter_model.safetensors", out);
    EXPECT(file_exists(path), "%s was not written", path);
    snprintf(path, sizeof path, "%s/adapter", out);
    CHECK("load adapter", whet_session_load_adapter(session, path, "saved", &err));
    WhetEvalReport reloaded;
    CHECK("evaluate the loaded adapter", whet_session_evaluate(session, &reloaded, &err));
    printf("loaded adapter: accuracy %.4f\n", reloaded.accuracy);
    EXPECT(fabs(reloaded.accuracy - eval.accuracy) < 1e-9 && fabs(reloaded.loss - eval.loss) < 1e-4,
           "the saved adapter evaluates differently (%.6f vs %.6f)", reloaded.loss, eval.loss);
    CHECK("back to the trained method", whet_session_set_adapter(session, "default", &err));

    /* 5. Sentence embeddings (normalised). */
    size_t dim = 0;
    CHECK("embedding dim", whet_session_embedding_dim(session, &dim, &err));
    const char *texts[3] = {"A wonderful film, I loved it.", "An absolutely great movie.",
                            "The battery died after a day."};
    float *vectors = malloc(3 * dim * sizeof(float));
    EXPECT(vectors != NULL, "out of memory");
    WhetStatus embedded = whet_session_embed(session, texts, 3, 1, vectors, 3 * dim, &err);
    float similar = 0, different = 0;
    for (size_t i = 0; embedded == WHET_STATUS_OK && i < dim; i++) {
        similar += vectors[i] * vectors[dim + i];
        different += vectors[i] * vectors[2 * dim + i];
    }
    free(vectors);
    CHECK("embed", embedded);
    printf("embeddings of %zu values: cosine(similar) %.3f, cosine(unrelated) %.3f\n", dim,
           similar, different);
    EXPECT(similar > different, "similar sentences are not closer than unrelated ones");

    /* 6. A second run, cancelled from the callback at step 3, then continued for 2 steps. */
    snprintf(config, sizeof config,
             "{\"output\": {\"dir\": \"%s/second\"}, \"training\": {\"seed\": 7}}", out);
    CHECK("configure", whet_session_configure(session, config, &err));
    struct progress_state cancelling = {3, 0};
    printf("second run, cancelled at step 3:\n");
    WhetStatus cancelled =
        whet_session_train(session, 0, on_progress, &cancelling, &report, &err);
    EXPECT(cancelled == WHET_STATUS_CANCELLED, "expected WHET_STATUS_CANCELLED, got %s",
           whet_status_name(cancelled));
    EXPECT(report.step == 3 && report.finished == 0, "cancelled at step %llu",
           (unsigned long long)report.step);
    printf("cancelled at step %llu; continuing for 2 steps:\n", (unsigned long long)report.step);
    cancelling.cancel_at = 0;
    CHECK("continue", whet_session_train(session, 2, on_progress, &cancelling, &report, &err));
    uint64_t expected = report.total_steps < 5 ? report.total_steps : 5;
    EXPECT(report.step == expected, "the continued run is at step %llu, not %llu",
           (unsigned long long)report.step, (unsigned long long)expected);
    printf("continued to step %llu of %llu\n", (unsigned long long)report.step,
           (unsigned long long)report.total_steps);

    /* 7. Misuse is an error, not a crash. */
    CHECK("free", whet_session_free(session));
    WhetStatus again = whet_session_free(session);
    EXPECT(again == WHET_STATUS_INVALID_HANDLE, "double free gave %s", whet_status_name(again));
    WhetStatus stale = whet_session_evaluate(session, &eval, &err);
    EXPECT(stale == WHET_STATUS_INVALID_HANDLE && err != 0, "a freed session gave %s",
           whet_status_name(stale));
    printf("freed session: %s\n", whet_error_message(err));
    whet_error_free(err);
    err = 0;
    session = 0;

    printf("c-embed: all checks passed\n");
    return 0;

fail:
    whet_session_free(session);
    return 1;
}
