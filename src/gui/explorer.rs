//! The guidance explorer: a 3×3 grid of edits over guidance_scale × image_guidance_scale around
//! the current values, same image, instruction and seed, rendered one cell after another on the
//! model thread (the prompt embeddings and image latents are reused, so each cell costs only its
//! denoising). A click on a finished cell adopts its values.

use std::sync::Arc;

use egui::{TextureHandle, TextureOptions};
use image::RgbImage;

use crate::worker::{EditResult, EditSettings, JobId};

use super::settings::{GUIDANCE_RANGE, IMAGE_GUIDANCE_RANGE};
use super::state::{Purpose, RunningEdit};
use super::textures::display_image;

/// Distance between neighbouring columns (text guidance) and rows (image guidance).
pub const GUIDANCE_STEP: f64 = 2.5;
pub const IMAGE_GUIDANCE_STEP: f64 = 0.5;
/// Cells per side.
pub const GRID_SIDE: usize = 3;

/// Where a cell is.
#[derive(Clone)]
pub enum CellState {
    Waiting,
    Running(JobId),
    Done {
        result: Arc<EditResult>,
        texture: TextureHandle,
    },
    Failed(String),
}

/// One grid cell.
#[derive(Clone)]
pub struct Cell {
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    pub state: CellState,
}

/// The grid and whether it is being rendered.
#[derive(Clone, Default)]
pub struct Explorer {
    /// Row-major: rows are image guidance (top = strongest), columns text guidance (ascending).
    pub cells: Vec<Cell>,
    /// The settings every cell shares (scales aside).
    pub base: Option<EditSettings>,
    /// The input the grid edits.
    pub source: Option<Arc<RgbImage>>,
    /// Cells are being sent one after another.
    pub running: bool,
    pub open: bool,
}

/// Three distinct values `step` apart centred on `value` and inside `range` (the centre moves
/// inward at the ends of the range).
pub fn around(value: f64, step: f64, (low, high): (f64, f64)) -> [f64; GRID_SIDE] {
    let centre = value.clamp(low + step, high - step);
    [centre - step, centre, centre + step]
}

impl Explorer {
    /// Whether the grid was planned for these settings (scales aside), so rendering continues it.
    pub fn matches(&self, settings: &EditSettings) -> bool {
        self.base.as_ref().is_some_and(|base| {
            base.prompt == settings.prompt
                && base.negative_prompt == settings.negative_prompt
                && base.steps == settings.steps
                && base.seed == settings.seed
                && base.scheduler == settings.scheduler
        }) && !self.cells.is_empty()
    }

    /// A new grid around `settings`' scales.
    pub fn plan(&mut self, settings: &EditSettings, source: Arc<RgbImage>) {
        let columns = around(settings.guidance_scale, GUIDANCE_STEP, GUIDANCE_RANGE);
        let rows = around(
            settings.image_guidance_scale,
            IMAGE_GUIDANCE_STEP,
            IMAGE_GUIDANCE_RANGE,
        );
        self.cells = rows
            .iter()
            .rev()
            .flat_map(|&image_guidance_scale| {
                columns.iter().map(move |&guidance_scale| Cell {
                    guidance_scale,
                    image_guidance_scale,
                    state: CellState::Waiting,
                })
            })
            .collect();
        self.base = Some(settings.clone());
        self.source = Some(source);
        self.running = false;
    }

    /// Forgets the grid (a new input makes it meaningless).
    pub fn clear(&mut self) {
        let open = self.open;
        *self = Self {
            open,
            ..Self::default()
        };
    }

    /// The next waiting cell and its settings.
    pub fn next_job(&self) -> Option<(usize, EditSettings)> {
        let base = self.base.as_ref()?;
        let index = self
            .cells
            .iter()
            .position(|c| matches!(c.state, CellState::Waiting))?;
        let cell = &self.cells[index];
        let settings = EditSettings {
            guidance_scale: cell.guidance_scale,
            image_guidance_scale: cell.image_guidance_scale,
            ..base.clone()
        };
        Some((index, settings))
    }

    pub fn mark_running(&mut self, cell: usize, id: JobId) {
        if let Some(cell) = self.cells.get_mut(cell) {
            cell.state = CellState::Running(id);
        }
    }

    pub fn cell_done(&mut self, cell: usize, result: Arc<EditResult>, ctx: &egui::Context) {
        if let Some(cell_state) = self.cells.get_mut(cell) {
            let texture = ctx.load_texture(
                format!("explorer-{cell}"),
                display_image(&result.image),
                TextureOptions::LINEAR,
            );
            cell_state.state = CellState::Done { result, texture };
        }
    }

    /// A cell's edit was cancelled or replaced by another edit: it waits again and the grid
    /// pauses (the user wanted the model for something else).
    pub fn edit_replaced(&mut self, running: &RunningEdit) {
        if let Purpose::Explorer { cell } = running.purpose
            && let Some(cell) = self.cells.get_mut(cell)
            && matches!(cell.state, CellState::Running(id) if id == running.id)
        {
            cell.state = CellState::Waiting;
            self.running = false;
        }
    }

    pub fn edit_failed(&mut self, running: &RunningEdit, message: &str) {
        if let Purpose::Explorer { cell } = running.purpose
            && let Some(cell) = self.cells.get_mut(cell)
        {
            cell.state = CellState::Failed(message.to_string());
            self.running = false;
        }
    }

    /// A finished cell's result and the input it edited.
    pub fn cell_result(&self, cell: usize) -> Option<(Arc<EditResult>, Arc<RgbImage>)> {
        match &self.cells.get(cell)?.state {
            CellState::Done { result, .. } => Some((result.clone(), self.source.clone()?)),
            _ => None,
        }
    }

    /// Cells finished so far.
    pub fn done_count(&self) -> usize {
        self.cells
            .iter()
            .filter(|c| matches!(c.state, CellState::Done { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_values_stay_in_range_and_distinct() {
        assert_eq!(around(7.5, 2.5, GUIDANCE_RANGE), [5.0, 7.5, 10.0]);
        assert_eq!(around(1.0, 2.5, GUIDANCE_RANGE), [1.0, 3.5, 6.0]);
        assert_eq!(around(20.0, 2.5, GUIDANCE_RANGE), [15.0, 17.5, 20.0]);
        assert_eq!(around(0.0, 0.5, IMAGE_GUIDANCE_RANGE), [0.0, 0.5, 1.0]);

        let mut explorer = Explorer::default();
        let settings = EditSettings {
            guidance_scale: 7.5,
            image_guidance_scale: 1.5,
            ..EditSettings::default()
        };
        explorer.plan(&settings, Arc::new(RgbImage::new(8, 8)));
        assert_eq!(explorer.cells.len(), 9);
        // Top row: strongest image guidance; columns ascending text guidance.
        assert_eq!(explorer.cells[0].image_guidance_scale, 2.0);
        assert_eq!(explorer.cells[0].guidance_scale, 5.0);
        assert_eq!(explorer.cells[8].image_guidance_scale, 1.0);
        assert_eq!(explorer.cells[8].guidance_scale, 10.0);
        assert!(explorer.matches(&settings));
        let (index, first) = explorer.next_job().unwrap();
        assert_eq!((index, first.guidance_scale), (0, 5.0));
        explorer.mark_running(0, 7);
        assert_eq!(explorer.next_job().unwrap().0, 1);
        let other_seed = EditSettings {
            seed: 1,
            ..settings
        };
        assert!(!explorer.matches(&other_seed));
    }
}
