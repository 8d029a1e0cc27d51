package schedule

import (
	"bytes"
	"errors"
	"fmt"
	htmltemplate "html/template"
	"os"
	"strings"
	texttemplate "text/template"
)

// TemplateFiles names the files of one schedule's email: Subject and at
// least one of Text and HTML.
type TemplateFiles struct {
	Subject string
	Text    string
	HTML    string
}

// Templates are the parsed templates of one schedule. The text parts use
// text/template, the HTML part html/template (contextual escaping on), and
// every template fails on a missing key rather than printing "<no value>".
type Templates struct {
	files   TemplateFiles
	subject *texttemplate.Template
	text    *texttemplate.Template
	html    *htmltemplate.Template
}

// LoadTemplates reads and parses the files. Errors name the file and,
// for syntax errors, the line ("template: subject.tmpl:3: ...").
func LoadTemplates(f TemplateFiles) (*Templates, error) {
	if f.Subject == "" {
		return nil, errors.New("subject: no file; give the subject template's file")
	}
	if f.Text == "" && f.HTML == "" {
		return nil, errors.New("text, html: no file; give a text or an HTML template file, or both")
	}
	t := &Templates{files: f}
	read := func(path string) (string, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("template %s: %w", path, err)
		}
		return string(b), nil
	}
	src, err := read(f.Subject)
	if err != nil {
		return nil, err
	}
	if t.subject, err = texttemplate.New(f.Subject).Option("missingkey=error").Parse(strings.TrimRight(src, "\r\n")); err != nil {
		return nil, err
	}
	if f.Text != "" {
		if src, err = read(f.Text); err != nil {
			return nil, err
		}
		if t.text, err = texttemplate.New(f.Text).Option("missingkey=error").Parse(src); err != nil {
			return nil, err
		}
	}
	if f.HTML != "" {
		if src, err = read(f.HTML); err != nil {
			return nil, err
		}
		if t.html, err = htmltemplate.New(f.HTML).Option("missingkey=error").Parse(src); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// Rendered is one recipient's email content.
type Rendered struct {
	Subject, Text, HTML string
}

// Render executes the templates with data. Errors name the file, line and
// column of the failing action.
func (t *Templates) Render(data any) (Rendered, error) {
	var r Rendered
	var b bytes.Buffer
	if err := t.subject.Execute(&b, data); err != nil {
		return r, err
	}
	r.Subject = strings.TrimSpace(b.String())
	if strings.ContainsAny(r.Subject, "\r\n") {
		return r, fmt.Errorf("template %s: the rendered subject has a line break; keep it on one line", t.files.Subject)
	}
	if t.text != nil {
		b.Reset()
		if err := t.text.Execute(&b, data); err != nil {
			return r, err
		}
		r.Text = b.String()
	}
	if t.html != nil {
		b.Reset()
		if err := t.html.Execute(&b, data); err != nil {
			return r, err
		}
		r.HTML = b.String()
	}
	return r, nil
}
