// DeepOpt pages: small progressive enhancements. Every page works without this file.
(function () {
  "use strict";

  // Job form: show only the settings of the chosen kind (the server ignores the other kind's fields).
  function setUpKindPicker(form) {
    var radios = form.querySelectorAll('input[name="kind"]');
    var sections = form.querySelectorAll("[data-kind]");
    function sync() {
      var chosen = form.querySelector('input[name="kind"]:checked');
      sections.forEach(function (section) {
        section.hidden = !!chosen && section.getAttribute("data-kind") !== chosen.value;
      });
    }
    radios.forEach(function (radio) { radio.addEventListener("change", sync); });
    sync();
  }

  // Destructive buttons ask first: <form data-confirm="Cancel job #3?">.
  function setUpConfirm(form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
    });
  }

  // The account menu is a <details>; close it when the user clicks elsewhere.
  function setUpMenus() {
    document.addEventListener("click", function (event) {
      document.querySelectorAll("details.usermenu[open]").forEach(function (menu) {
        if (!menu.contains(event.target)) menu.removeAttribute("open");
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("form.job-form").forEach(setUpKindPicker);
    document.querySelectorAll("form[data-confirm]").forEach(setUpConfirm);
    setUpMenus();
    var firstError = document.querySelector(".job-form .has-error input, .job-form .has-error select");
    if (firstError) firstError.focus();
  });
})();
