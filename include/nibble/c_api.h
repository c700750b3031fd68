/* nibble's C interface: the optimizer library behind a plain C ABI, for language bindings (the
 * Python package loads it with ctypes) and for C callers. Every function returns 0 on success, or
 * a non-zero code with the message in nibble_last_error(); none throws or exits. */
#ifndef NIBBLE_C_API_H
#define NIBBLE_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NIBBLE_C_EXPORT __attribute__((visibility("default")))

enum {
  NIBBLE_OK = 0,
  NIBBLE_INVALID_ARGUMENT = 1, /* a bad value, named in the message */
  NIBBLE_STATE_MISMATCH = 2,   /* saved state does not fit this optimizer */
  NIBBLE_FORMAT_ERROR = 3,     /* a corrupt or foreign state file */
  NIBBLE_IO_ERROR = 4,
  NIBBLE_OUT_OF_MEMORY = 5,
  NIBBLE_DEVICE_ERROR = 6, /* no CUDA in this build or machine, or a CUDA call failed */
  NIBBLE_ERROR = 7
};

/* Element types of parameters and gradients. */
enum { NIBBLE_F32 = 0, NIBBLE_BF16 = 1, NIBBLE_F16 = 2 };

typedef struct nibble_optimizer nibble_optimizer;

typedef struct {
  const char* name;     /* unique; NULL: "param.<index>" */
  int32_t rank;
  const int64_t* shape; /* rank entries */
  void* data;           /* host (cpu) or device (cuda) memory */
  void* grad;           /* NULL: no gradient yet */
  int32_t dtype;        /* NIBBLE_F32 (cpu and cuda), NIBBLE_BF16 or NIBBLE_F16 (cuda) */
  int32_t grad_dtype;   /* NIBBLE_F32, or NIBBLE_BF16 or NIBBLE_F16 (cuda) */
  /* Sharded training: the whole tensor's shape (rank entries) when data is one rank's piece of
   * it, or NULL: the same as shape. nibble decides precision, weight decay and the like from it. */
  const int64_t* global_shape;
  int32_t split;        /* non-zero: other ranks hold other elements of this tensor */
} nibble_param;

/* The thread's last error message ("" after a success). */
NIBBLE_C_EXPORT const char* nibble_last_error(void);
/* 1 when this library has the CUDA backend and a CUDA device is visible. */
NIBBLE_C_EXPORT int nibble_cuda_available(void);

/* options_json: {"algorithm": "adamw", "precision": "8bit", "device": "cpu"|"cuda",
 * "hyper": {"lr": ..., "beta1": ..., ...every nibble::Hyper field by name...}, "block_size": 0,
 * "min_quant_size": 4096, "max_grad_norm": 0, "check_finite": true, "stochastic_rounding": false,
 * "seed": 0, "rank1_second_moment": false, "master_weights": false,
 * "param_stochastic_rounding": false, "full_precision_names": [...], "no_decay_names": [...],
 * "no_decay_vectors": false, "use_muon": null|true|false, "adamw_names": [...]}. A hyperparameter
 * with choices (Muon's "adjust_lr") also takes a choice's name. Unknown keys are refused by name. */
/* Checks options_json as nibble_create does (algorithm, hyperparameters, precision, block size and
 * the rest), without parameters and without looking for a device. */
NIBBLE_C_EXPORT int nibble_check_options(const char* options_json);
/* The library's tables as JSON, valid while the library is loaded: {"algorithms": [{"name",
 * "alias", "title", "defaults": {every hyperparameter}, "numbers": [{"name", "range"}] (validated,
 * besides lr and weight_decay), "flags": [...] (read, besides maximize), "state": [slot names at
 * the defaults]}], "precisions": ["fp32", ...], "hyper": [{"name", "type": "number"|"flag",
 * "choices": [names] (a number that holds the index of one)}]}. NULL, with nibble_last_error()
 * saying why, when they cannot be made (out of memory). */
NIBBLE_C_EXPORT const char* nibble_tables_json(void);
NIBBLE_C_EXPORT int nibble_create(const char* options_json, const nibble_param* params, int64_t count,
                                  nibble_optimizer** out);
NIBBLE_C_EXPORT void nibble_destroy(nibble_optimizer* optimizer);

/* Points every parameter at its gradient (NULL: none this step); cheap when nothing changed.
 * cuda: `stream` (a cudaStream_t, NULL: the optimizer's) becomes the optimizer's stream first, so
 * the table upload is ordered before the step queued next on it; inside a CUDA graph capture it
 * waits for nothing on the host. cpu: `stream` must be NULL. */
NIBBLE_C_EXPORT int nibble_set_grads(nibble_optimizer* optimizer, void* const* grads, int64_t count, void* stream);
/* One step. cpu: runs it; cuda: queues it on `stream` (a cudaStream_t, NULL: the optimizer's) and
 * returns without waiting; skipped, grad_norm and step (any may be NULL) are then not filled:
 * read them with nibble_counters() or from the device scalars. found_inf != 0 skips the step. */
NIBBLE_C_EXPORT int nibble_step(nibble_optimizer* optimizer, float grad_scale, float lr_scale, int32_t found_inf,
                                void* stream, int32_t* skipped, double* grad_norm, int64_t* step);
/* Sharded training, cpu: the sum of squared gradients (as set, not divided by a scale) of the
 * parameters that have one, in double; counted (count flags, one per parameter, or NULL for all)
 * leaves out those whose flag is 0, e.g. replicated tensors that another rank counts. */
NIBBLE_C_EXPORT int nibble_grad_square_sum(nibble_optimizer* optimizer, const uint8_t* counted, int64_t count,
                                           double* out);
/* Sharded training, cpu: nibble_step with the non-finite check and clipping taken from
 * grad_square_sum, the sum of nibble_grad_square_sum over all ranks, so every rank skips or clips
 * alike. */
NIBBLE_C_EXPORT int nibble_step_with_square_sum(nibble_optimizer* optimizer, float grad_scale, float lr_scale,
                                                int32_t found_inf, double grad_square_sum, int32_t* skipped,
                                                double* grad_norm, int64_t* step);
/* cuda: queues a step that reads lr_scale, grad_scale and found_inf from the device scalars
 * (capturable in a CUDA graph). */
NIBBLE_C_EXPORT int nibble_enqueue_step(nibble_optimizer* optimizer, void* stream);
/* Sharded training, cuda, without host round trips: queues on `stream` (NULL: the optimizer's) the
 * sum of squared gradients (as nibble_grad_square_sum, counted likewise) into the device double at
 * `out`. New counted flags are copied from the host: not inside a CUDA graph capture. */
NIBBLE_C_EXPORT int nibble_enqueue_grad_square_sum(nibble_optimizer* optimizer, const uint8_t* counted, int64_t count,
                                                   double* out, void* stream);
/* Sharded training, cuda: nibble_enqueue_step whose non-finite check and clipping take the device
 * double at `square_sum` (read when the step runs, e.g. after an all-reduce of every rank's
 * nibble_enqueue_grad_square_sum) instead of this optimizer's own gradients. */
NIBBLE_C_EXPORT int nibble_enqueue_step_with_square_sum(nibble_optimizer* optimizer, const double* square_sum,
                                                        void* stream);
/* cuda: device addresses of float lr_scale, float grad_scale, int32 found_inf, int64 steps. */
NIBBLE_C_EXPORT int nibble_device_scalars(nibble_optimizer* optimizer, void** lr_scale, void** grad_scale,
                                          void** found_inf, void** steps);
/* cuda: device address of the double the last queued step writes its gradient norm to (NaN when
 * it computed none). */
NIBBLE_C_EXPORT int nibble_device_grad_norm(nibble_optimizer* optimizer, void** grad_norm);
NIBBLE_C_EXPORT int nibble_counters(nibble_optimizer* optimizer, int64_t* steps, int64_t* skipped);
NIBBLE_C_EXPORT int nibble_state_bytes(nibble_optimizer* optimizer, int64_t* params, int64_t* bytes);
NIBBLE_C_EXPORT int nibble_save(nibble_optimizer* optimizer, const char* path);
NIBBLE_C_EXPORT int nibble_load(nibble_optimizer* optimizer, const char* path);
/* Sharded checkpoints. The values of state `name` ("exp_avg", "master", ...) of one parameter as
 * fp32, count of them (the parameter's element count; Adafactor's factors their own): quantized
 * state dequantized so that nibble_set_state_values gives back the same codes and absmax where the
 * blocks are the same. nibble_set_state_values quantizes, rounds or copies them back after checking
 * the count and that they are finite (and >= 0 for second moments); nothing changes on an error.
 * nibble_set_step_counts sets each parameter's step count, the steps taken and the skipped;
 * nibble_set_running_sums schedule-free AdamW's lr_max and weight_sum of each parameter. */
NIBBLE_C_EXPORT int nibble_state_values(nibble_optimizer* optimizer, int64_t param_index, const char* name, float* out,
                                        int64_t count);
NIBBLE_C_EXPORT int nibble_set_state_values(nibble_optimizer* optimizer, int64_t param_index, const char* name,
                                            const float* values, int64_t count);
NIBBLE_C_EXPORT int nibble_set_step_counts(nibble_optimizer* optimizer, const int64_t* tensor_steps, int64_t count,
                                           int64_t steps, int64_t skipped);
NIBBLE_C_EXPORT int nibble_set_running_sums(nibble_optimizer* optimizer, const double* lr_max, const double* weight_sum,
                                            int64_t count);
/* SophiaG: one fp32 Hessian-diagonal estimate per parameter (NULL skips one), on its device. cuda:
 * `stream` (NULL: the optimizer's current one) is the stream that wrote the estimates; the update
 * is queued on it and becomes the optimizer's stream, as with nibble_set_grads. */
NIBBLE_C_EXPORT int nibble_update_hessian(nibble_optimizer* optimizer, const float* const* estimates, int64_t count,
                                          void* stream);
/* Changes hyperparameters between steps (Optimizer::set_hyper): `hyper_json` is an object of the
 * fields to change, as in the options' "hyper" ({"beta1": 0.85, "weight_decay": 0.05}); the others
 * keep their current values. Refused, with nothing changed, for a bad value or a field that decides
 * which state is kept (amsgrad, first_moment). cuda: `stream` (NULL: the optimizer's) becomes the
 * optimizer's stream first, and the change is ordered on it before the next step. */
NIBBLE_C_EXPORT int nibble_set_hyper(nibble_optimizer* optimizer, const char* hyper_json, void* stream);
/* Schedule-free AdamW: parameters to y (train) or to the averaged x (eval); no-ops in that mode
 * already and for other algorithms. nibble_training sets *train to 1 in train mode, else 0. */
NIBBLE_C_EXPORT int nibble_train(nibble_optimizer* optimizer);
NIBBLE_C_EXPORT int nibble_eval(nibble_optimizer* optimizer);
NIBBLE_C_EXPORT int nibble_training(nibble_optimizer* optimizer, int32_t* train);

#ifdef __cplusplus
}
#endif

#endif /* NIBBLE_C_API_H */
