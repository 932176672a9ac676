//! One frame of the window for eframe: the editor's logic, then the panels and dialogs drawn over
//! its state, then the frame's bookkeeping. The only place that joins [`super::app`] with the
//! drawing modules, so those read the editor and the editor never calls them.

use super::app::EditorApp;

impl eframe::App for EditorApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        EditorApp::logic(self, ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        super::panels::show(self, ui);
        super::dialogs::show(self, ui.ctx());
        self.end_frame();
    }

    fn on_exit(&mut self) {
        self.exit();
    }
}
