// Package web is sendonce's dashboard: an overview with live counters and a
// chart of the last hour, a searchable list of emails, an email's page with
// its timeline and body, the in-doubt queue with its decisions, and the
// schedules with their fires' progress.
//
// It is static HTML, CSS and JavaScript embedded in the binary, served on
// the API's port; nothing is fetched from elsewhere. Every piece of data is
// read through the HTTP API with the operator's bearer token, so the
// dashboard is behind exactly the API's authentication (tokens compared in
// constant time) and an operator's decision is recorded with the token's
// name like any other API call. The token is kept in the browser tab's
// sessionStorage and sent as an Authorization header, never as a cookie, so
// no other site can make the browser act with it (no CSRF).
package web

import (
	"bytes"
	"embed"
	"io/fs"
	"net/http"
	"strings"
)

//go:embed ui
var files embed.FS

// csp allows only this origin's scripts and styles; an email's HTML body is
// shown in a sandboxed frame that runs no script.
const csp = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// Config configures the dashboard.
type Config struct {
	// API serves every request that is not the dashboard's.
	API http.Handler
	// AuthRequired: the API has tokens, so the dashboard asks for one
	// before its first request instead of provoking a 401.
	AuthRequired bool
}

// Handler serves the dashboard at / and its files under /ui/, and passes
// every other request to the API.
func Handler(cfg Config) http.Handler {
	ui, err := fs.Sub(files, "ui")
	if err != nil {
		panic(err) // the embedded directory is part of the binary
	}
	page, err := fs.ReadFile(ui, "index.html")
	if err != nil {
		panic(err)
	}
	if cfg.AuthRequired {
		page = bytes.Replace(page, []byte("<body>"), []byte(`<body data-auth="required">`), 1)
	}
	api := cfg.API
	static := http.StripPrefix("/ui/", http.FileServerFS(ui))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/" && (r.Method == http.MethodGet || r.Method == http.MethodHead):
			secure(w)
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			w.Write(page)
		case strings.HasPrefix(r.URL.Path, "/ui/") && (r.Method == http.MethodGet || r.Method == http.MethodHead):
			secure(w)
			static.ServeHTTP(w, r)
		default:
			api.ServeHTTP(w, r)
		}
	})
}

func secure(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Security-Policy", csp)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-cache")
}
