//! diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` (DPM-Solver++
//! 2M by default): multistep data-prediction solver of order 1 or 2, midpoint or Heun
//! second-order update, lower-order final steps, Karras sigmas, lambda clipping.

use candle_core::Tensor;

use super::common::{Schedule, SchedulerCore, StepInput, StepOutput, schedule_field_access};
use super::euler::final_sigma;
use super::schedule::{
    Spacing, alphas_cumprod, check_num_steps, karras_sigmas, leading, mul_scalar,
    numpy_interp_on_index_grid, numpy_linspace, predicted_original, round_half_even, sigma_to_t,
    trailing, train_sigmas,
};
use super::{
    PredictionType, SchedulerConfig, SchedulerError, reject_if_true, reject_unimplemented_sigmas,
};

const CLASS: &str = "DPMSolverMultistepScheduler";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// `_sigma_to_alpha_sigma_t`: (alpha_t, sigma_t) = (1/sqrt(σ²+1), σ·alpha_t), float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// λ = log(alpha) − log(sigma), float32.
fn lambda(alpha_t: f32, sigma_t: f32) -> f32 {
    alpha_t.ln() - sigma_t.ln()
}

/// DPM-Solver++ multistep sampling, after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    schedule: Schedule,
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_is_zero: bool,
    /// Converted (x0) model outputs of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
    /// The step index the multistep history expects next.
    next_step_index: usize,
}

impl DpmSolverMultistepScheduler {
    /// Builds the schedule of `num_steps` inference steps from a (possibly other class's) config.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self, SchedulerError> {
        check_num_steps(num_steps)?;
        let prediction_type = PredictionType::parse(&config.prediction_type, CLASS)?;
        match config.algorithm_type.as_deref() {
            // diffusers maps "deis" to dpmsolver++.
            None | Some("dpmsolver++") | Some("deis") => {}
            Some(other) => {
                return Err(SchedulerError::unsupported(CLASS, "algorithm_type", other));
            }
        }
        let solver_type = match config.solver_type.as_deref() {
            // diffusers maps "logrho", "bh1", "bh2" to midpoint.
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => {
                SolverType::Midpoint
            }
            Some("heun") => SolverType::Heun,
            Some(other) => {
                return Err(SchedulerError::unsupported(CLASS, "solver_type", other));
            }
        };
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=2).contains(&solver_order) {
            return Err(SchedulerError::unsupported(
                CLASS,
                "solver_order",
                solver_order,
            ));
        }
        reject_if_true(config.thresholding, CLASS, "thresholding")?;
        reject_unimplemented_sigmas(config, CLASS)?;
        reject_if_true(config.use_lu_lambdas, CLASS, "use_lu_lambdas")?;
        reject_if_true(config.use_flow_sigmas, CLASS, "use_flow_sigmas")?;
        reject_if_true(config.use_dynamic_shifting, CLASS, "use_dynamic_shifting")?;
        if let Some(variance_type) = &config.variance_type {
            return Err(SchedulerError::unsupported(
                CLASS,
                "variance_type",
                variance_type,
            ));
        }

        let train = config.num_train_timesteps;
        let alphas_cumprod = alphas_cumprod(config, CLASS, true)?;
        // lambda_t in float32; torch.searchsorted(flip(lambda_t), lambda_min_clipped) (left).
        let lambda_min_clipped = config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        let clipped_idx = alphas_cumprod
            .iter()
            .rev()
            .map(|&a| lambda(a.sqrt(), (1.0 - a).sqrt()))
            .take_while(|&l| (l as f64) < lambda_min_clipped)
            .count();
        let last_timestep = train - clipped_idx;
        let spacing = Spacing::resolve(config, CLASS, Spacing::Linspace)?;
        let n = num_steps;
        let mut timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => {
                let mut t: Vec<i64> = numpy_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .rev()
                    .map(|t| round_half_even(t) as i64)
                    .collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let mut t: Vec<i64> = leading(n + 1, last_timestep / (n + 1))
                    .into_iter()
                    .map(|t| t as i64 + config.steps_offset as i64)
                    .collect();
                t.pop();
                t
            }
            Spacing::Trailing => trailing(last_timestep as f64, train as f64 / n as f64)
                .into_iter()
                .map(|t| t as i64)
                .collect(),
        };
        if timesteps.is_empty() {
            return Err(SchedulerError::InvalidValue {
                option: "lambda_min_clipped",
                value: lambda_min_clipped.to_string(),
                reason: "clips away every timestep",
            });
        }
        let train_sigmas = train_sigmas(&alphas_cumprod);
        let sigmas: Vec<f64> = if config.use_karras_sigmas == Some(true) {
            // np.log of the float32 table stays float32.
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = config
                .sigma_max
                .unwrap_or(train_sigmas[train_sigmas.len() - 1] as f64);
            let sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let round = config.beta_schedule != "squaredcos_cap_v2";
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    // `.round()` then `.to(int64)` (truncation) as diffusers does.
                    (if round { round_half_even(t) } else { t }) as i64
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| numpy_interp_on_index_grid(t as f64, &train_sigmas))
                .collect()
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let last_sigma = final_sigma(config, CLASS, &alphas_cumprod)?;
        sigmas.push(last_sigma);
        Ok(Self {
            schedule: Schedule {
                sigmas,
                ..Schedule::new(
                    timesteps.iter().map(|&t| t as f64).collect(),
                    prediction_type,
                )
            },
            solver_order,
            solver_type,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_is_zero: matches!(config.final_sigmas_type.as_deref(), None | Some("zero")),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            next_step_index: 0,
        })
    }

    /// `convert_model_output` for dpmsolver++: the predicted x0.
    fn convert_model_output(
        &self,
        output: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.schedule.sigmas[step_index]);
        predicted_original(
            self.schedule.prediction_type,
            output,
            sample,
            alpha_t,
            sigma_t,
        )
    }

    fn first_order_update(
        &self,
        x0: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.schedule.sigmas[step_index + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.schedule.sigmas[step_index]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let sample_coeff = sigma_t / sigma_s;
        let x0_coeff = alpha_t * ((-h).exp() - 1.0);
        mul_scalar(sample, sample_coeff)? - mul_scalar(x0, x0_coeff)?
    }

    fn second_order_update(
        &self,
        m0: &Tensor,
        m1: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.schedule.sigmas[step_index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.schedule.sigmas[step_index]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.schedule.sigmas[step_index - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d1 = mul_scalar(&(m0 - m1)?, 1.0 / r0)?;
        let exp_m1 = (-h).exp() - 1.0;
        let x_t = (mul_scalar(sample, sigma_t / sigma_s0)? - mul_scalar(m0, alpha_t * exp_m1)?)?;
        match self.solver_type {
            SolverType::Midpoint => x_t - mul_scalar(&d1, 0.5 * (alpha_t * exp_m1))?,
            SolverType::Heun => x_t + mul_scalar(&d1, alpha_t * (exp_m1 / h + 1.0))?,
        }
    }
}

impl SchedulerCore for DpmSolverMultistepScheduler {
    schedule_field_access!();

    fn step_f32(&mut self, input: StepInput<'_>) -> candle_core::Result<StepOutput> {
        let (step_index, output, sample) = (input.step_index, &input.output, &input.sample);
        let len = self.schedule.timesteps.len();
        if step_index != self.next_step_index {
            candle_core::bail!(
                "{CLASS} is multistep: expected step {} next, got {step_index}",
                self.next_step_index
            );
        }
        let lower_order_final = step_index == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.final_sigma_is_zero);
        let x0 = self.convert_model_output(output, sample, step_index)?;
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(x0.clone());

        let prev_sample =
            if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
                self.first_order_update(&x0, sample, step_index)?
            } else {
                // solver_order == 2 (higher orders are rejected in `new`), so diffusers'
                // `lower_order_second` (a third-order fallback) never changes the branch.
                let m1 = &self.model_outputs[self.model_outputs.len() - 2];
                self.second_order_update(&x0, m1, sample, step_index)?
            };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step_index = step_index + 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }
}
